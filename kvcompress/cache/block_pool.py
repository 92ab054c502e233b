"""The one pool of physical blocks shared by every layer, KV head and sequence."""

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
    """A stack of free block ids held in a tensor, so allocation and freeing are slices."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Reversed so that the first allocations get low block ids (easier to read in debugging).
        self._stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.long, device=device)
        self._num_free = num_blocks
        self._peak_used = 0

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
        return blocks

    def free(self, blocks: torch.Tensor) -> None:
        n = blocks.numel()
        if self._num_free + n > self.num_blocks:
            raise RuntimeError("freeing more blocks than were allocated (double free)")
        self._stack[self._num_free : self._num_free + n] = blocks.reshape(-1)
        self._num_free += n

    def free_ids(self) -> torch.Tensor:
        """The free block ids (a copy), for checks and statistics."""
        return self._stack[: self._num_free].clone()
