"""Host-to-device uploads through a fixed ring of recycled pinned buffers on a copy stream.

Weights come from the memory-mapped file (pageable memory). Each piece is copied into the next
pinned buffer of the ring, then sent to the device asynchronously on a dedicated stream, so the
CPU fills buffer i+1 while the DMA engine drains buffer i. No host memory is allocated per tensor;
the ring's few buffers are all there is. Consumers on the compute stream wait on the upload's
CUDA event, never on the whole device.

With METALLIC_DEBUG=1 each pinned buffer is checked (lifetime.py) to be unchanged until its copy
has left it. Without CUDA the copy is synchronous; debug mode then checks the source as if it were
not, up to the next upload or `synchronize()`, so the checks run in CI. (The destination needs no
check: the compute stream waits for the copy before anything it enqueues can touch it.)
"""

from __future__ import annotations

import time

import torch

from metallic.runtime.lifetime import LifetimeTracker, debug_enabled

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
        self.tracker = LifetimeTracker() if debug_enabled() else None
        self.n_uploads = 0  # counted in debug mode only, to name uploads in errors
        if not self.active:
            return
        self.stream = torch.cuda.Stream(device)
        self.buffers = [
            torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(n_buffers)
        ]
        self.ready: list[torch.cuda.Event | None] = [None] * n_buffers
        self.next = 0

    def upload(
        self, src: torch.Tensor, out: torch.Tensor | None = None, label: str | None = None
    ) -> torch.Tensor:
        """`src` (host bytes, e.g. a view of the map) on the device, in `out` (a contiguous uint8
        tensor of src's size) or a new tensor. The compute stream waits for it on the GPU.
        `label` names the upload in debug mode's errors."""
        if self.tracker is not None:
            self.tracker.poll()  # earlier uploads that have completed
            self.n_uploads += 1
            label = label or f"upload {self.n_uploads}"
        host = src
        src = src.reshape(-1).view(torch.uint8)
        if not self.active:
            result = src.to(self.device) if out is None else out.copy_(src)
            if self.tracker is not None:
                self.tracker.watch(f"{label} source", host)
            return result
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
                if self.tracker is not None:
                    self.tracker.poll()  # check it (and any other finished copy) before refilling
            buffer = self.buffers[index][: piece.numel()]
            buffer.copy_(piece)
            with torch.cuda.stream(self.stream):
                out[first : first + piece.numel()].copy_(buffer, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            self.ready[index] = done
            if self.tracker is not None:
                # What the asynchronous copy reads. `src` itself was read above, before upload
                # returns, and `out` is ordered by the compute stream's wait: neither is at risk.
                name = f"{label} bytes {first}.. (staging buffer {index})"
                self.tracker.watch(name, buffer, done)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.bytes_uploaded += src.numel()
        self.seconds += time.perf_counter() - began
        return out

    def synchronize(self) -> None:
        """Wait for every copy in flight; in debug mode, check what each one used."""
        if self.active:
            self.stream.synchronize()
        if self.tracker is not None:
            self.tracker.synchronize()

    def stats(self) -> dict[str, float]:
        n = len(self.buffers) if self.active else 0
        return {
            "buffers": n,
            "pinned_bytes": n * self.buffer_bytes,
            "bytes_uploaded": self.bytes_uploaded,
            "host_seconds": self.seconds,
        }
