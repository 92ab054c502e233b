"""Reusable scratch memory for compression passes.

A compression pass needs several large temporaries (gathered metrics, sort outputs, staged
moves). Allocating them afresh each pass costs more than the work itself on CPU, where the
allocator returns big buffers to the OS and every reuse page-faults; so they live here,
grown when a pass needs more and reused after.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of this shape backed by the named buffer (contents undefined)."""
        numel = math.prod(shape)
        key = (name, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # Grow by half again, so a slowly rising size does not reallocate every pass.
            size = max(numel, int(buffer.numel() * 1.5) if buffer is not None else 0)
            buffer = torch.empty(size, dtype=dtype, device=self.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
