"""Host-to-device uploads through a fixed ring of recycled pinned buffers on a copy stream.

Weights come from the memory-mapped file (pageable memory). Each piece is copied into the next
pinned buffer of the ring, then sent to the device asynchronously on a dedicated stream, so the
CPU fills buffer i+1 while the DMA engine drains buffer i. No host memory is allocated per tensor;
the ring's few buffers are all there is. Consumers on the compute stream wait on the upload's
CUDA event, never on the whole device.
"""

from __future__ import annotations

import time

import torch

DEFAULT_BUFFERS = 4
DEFAULT_BUFFER_BYTES = 32 << 20


class StagingRing:
    def __init__(
        self,
        device: torch.device,
        n_buffers: int = DEFAULT_BUFFERS,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self.device = device
        self.buffer_bytes = buffer_bytes
        self.bytes_uploaded = 0
        self.seconds = 0.0  # host time spent in upload() (filling buffers, waiting for them)
        self.active = device.type == "cuda"
        if not self.active:
            return
        self.stream = torch.cuda.Stream(device)
        self.buffers = [
            torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(n_buffers)
        ]
        self.ready: list[torch.cuda.Event | None] = [None] * n_buffers
        self.next = 0

    def upload(self, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`src` (host bytes, e.g. a view of the map) on the device, in `out` (a contiguous uint8
        tensor of src's size) or a new tensor. The compute stream waits for it on the GPU."""
        src = src.reshape(-1).view(torch.uint8)
        if not self.active:
            return src.to(self.device) if out is None else out.copy_(src)
        began = time.perf_counter()
        if out is None:
            out = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
        done = None
        for first in range(0, src.numel(), self.buffer_bytes):
            piece = src[first : first + self.buffer_bytes]
            index = self.next
            self.next = (index + 1) % len(self.buffers)
            previous = self.ready[index]
            if previous is not None:
                previous.synchronize()  # this buffer's last copy has left it
            buffer = self.buffers[index][: piece.numel()]
            buffer.copy_(piece)
            with torch.cuda.stream(self.stream):
                out[first : first + piece.numel()].copy_(buffer, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            self.ready[index] = done
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.bytes_uploaded += src.numel()
        self.seconds += time.perf_counter() - began
        return out

    def stats(self) -> dict[str, float]:
        n = len(self.buffers) if self.active else 0
        return {
            "buffers": n,
            "pinned_bytes": n * self.buffer_bytes,
            "bytes_uploaded": self.bytes_uploaded,
            "host_seconds": self.seconds,
        }
