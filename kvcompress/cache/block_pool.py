"""The one pool of physical blocks shared by every layer, KV head and sequence.

Every block carries a reference count: the block-table entries that point at it. A forked
sequence shares its parent's blocks (count > 1); a block returns to the free stack only
when its last reference is dropped.
"""

from __future__ import annotations

import torch


class OutOfBlocksError(RuntimeError):
    """Raised before anything is changed when a request needs more blocks than are free.

    The caller can act on it: compress sequences or preempt one, then try again.
    """

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} KV blocks but only {free} are free")
        self.needed = needed
        self.free = free


class BlockPool:
    """A stack of free block ids held in a tensor, so allocation and freeing are slices,
    and ``refcount [num_blocks]`` (long): references to each block (0 exactly when free)."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Reversed so that the first allocations get low block ids (easier to read in debugging).
        self._stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.long, device=device)
        self._num_free = num_blocks
        self._peak_used = 0
        self.refcount = torch.zeros(num_blocks, dtype=torch.long, device=device)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def peak_used(self) -> int:
        """The most blocks in use at once since creation or :meth:`reset_peak` (the real
        memory high-water mark, which falls between a step's appends and its compression)."""
        return self._peak_used

    def reset_peak(self) -> None:
        self._peak_used = self.num_used

    def allocate(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self._num_free:
            raise OutOfBlocksError(n, self._num_free)
        start = self._num_free - n
        blocks = self._stack[start : self._num_free].clone()
        self._num_free = start
        self._peak_used = max(self._peak_used, self.num_blocks - start)
        self.refcount[blocks] = 1
        return blocks

    def share(self, blocks: torch.Tensor) -> None:
        """One more reference to each of ``blocks`` (a block may appear several times)."""
        blocks = blocks.reshape(-1)
        self.refcount.index_add_(0, blocks, torch.ones_like(blocks))

    def free(self, blocks: torch.Tensor) -> int:
        """Drop one reference to each of ``blocks`` (repeats drop several); blocks left with
        none return to the free stack. Returns how many did."""
        blocks = blocks.reshape(-1)
        if blocks.numel() == 0:
            return 0
        ids, drops = blocks.unique(return_counts=True)
        left = self.refcount[ids] - drops
        if bool((left < 0).any()):
            raise RuntimeError("freeing a block more often than it is referenced (double free)")
        self.refcount[ids] = left
        released = ids[left == 0]
        r = released.numel()
        self._stack[self._num_free : self._num_free + r] = released
        self._num_free += r
        return r

    def free_ids(self) -> torch.Tensor:
        """The free block ids (a copy), for checks and statistics."""
        return self._stack[: self._num_free].clone()
