"""Each step's small host-device transfers, through pinned buffers reused in turn.

A step uploads its batch metadata and a few index tensors, and reads back its sampled ids. A copy
from pageable memory (`torch.tensor(values, device="cuda")`) waits for the device to drain the
stream, and allocating pinned memory per step asks the driver for page-locked memory while the
previous step's copies still hold theirs: either can stall the host until the step in flight is
done, which defeats queuing the next step ahead. Here a few pinned buffers are used in turn, each
reused only after the copy that last used it has completed (its event; with more buffers than
steps in flight that wait is over before it begins). On the CPU transfers are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SLOTS = 8  # buffers per direction: a step uses up to four, and two steps are in flight


class PinnedRing:
    def __init__(self, device: torch.device, slots: int = SLOTS) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # else torch looks it up, in Python, every call
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * slots
        # One event per buffer, recorded again at each use: a step makes a few transfers, and
        # creating an event and finding the stream cost the host more than the copy itself.
        self.events = [torch.cuda.Event() for _ in range(slots)] if self.cuda else []
        self.next = 0

    def _slot(self, n_bytes: int) -> torch.Tensor:
        """The next buffer (grown to `n_bytes`), once its last copy has completed."""
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        self.events[i].synchronize()  # returns at once for an event never recorded
        if self.buffers[i].numel() < n_bytes:
            size = max(n_bytes, 2 * self.buffers[i].numel(), 4096)
            self.buffers[i] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self.buffers[i]

    def _record(self) -> torch.cuda.Event:
        event = self.events[(self.next - 1) % len(self.buffers)]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def upload(
        self, values: np.ndarray | Sequence[int] | torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`values` (an array, a list of ints: int64, or a CPU tensor) on the device, without
        waiting for the device: in `out` (of their dtype and size) or a new tensor."""
        if isinstance(values, torch.Tensor):
            host = values
        elif isinstance(values, np.ndarray):
            host = torch.from_numpy(values)
        else:  # a list of ints, maybe empty
            host = torch.from_numpy(np.asarray(values, dtype=np.int64))
        if out is not None and (out.dtype != host.dtype or out.numel() != host.numel()):
            raise ValueError(f"upload: {host.numel()} {host.dtype} values into {out.numel()} "
                             f"{out.dtype}")  # fmt: skip
        if not self.cuda:
            return host.to(self.device) if out is None else out.copy_(host.view(out.shape))
        buffer = self._slot(host.nbytes)
        staged = buffer[: host.nbytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        if out is None:
            on_device = staged.to(self.device, non_blocking=True)
        else:
            on_device = out.copy_(staged.view(out.shape), non_blocking=True)
        self._record()
        return on_device

    def download(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying device `values` to the host: the host tensor, valid once the returned
        event has completed (None on the CPU: valid at once)."""
        if not self.cuda:
            return values.clone(), None
        buffer = self._slot(values.nbytes)
        host = buffer[: values.nbytes].view(values.dtype).view(values.shape)
        host.copy_(values, non_blocking=True)
        return host, self._record()
