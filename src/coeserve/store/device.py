"""The device tier: a fixed number of equal slots allocated once at start (on a CPU-only machine a
separate RAM arena, so a switch is a real copy there too), and the copier: one thread and, on CUDA, one
copy stream that moves an image from the host arena into a slot in chunks — following a disk read that
is still in progress — and marks each layer ready as soon as its last byte has landed.

Slots are equal and sized for the largest expert: an address never changes, so views and CUDA graphs
made for a slot stay valid, and there is no fragmentation to manage (docs/tiers.md)."""
from __future__ import annotations

import ctypes
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from coeserve.formats.image import ImageIndex
from coeserve.store.host import PAGE


@dataclass
class Slot:
    index: int
    buf: torch.Tensor
    events: list = field(default_factory=list)  # CUDA events, created once and reused by every switch
    owner: str | None = None
    model: object = None  # the model object bound to this slot's bytes, reused for same-config experts


class Transfer:
    """One image → slot copy. Layer i (-1 = embedding, num_layers = final norm and head) is usable once
    `wait_layer(i)` returns; on CUDA that means the caller's stream waits on the layer's event."""

    def __init__(self, slot: Slot, src: torch.Tensor, index: ImageIndex, source, cond: threading.Condition,
                 chunk: int, on_done=None):
        self.slot, self.src, self.index, self.source, self.cond = slot, src, index, source, cond
        self.chunk, self.on_done = chunk, on_done
        self.bounds = list(index.layer_ends) + [index.total_bytes]
        self.passed = 0  # bounds whose bytes are copied (CPU) or whose event is recorded (CUDA)
        self.error: Exception | None = None
        self.streaming = False  # a forward pass is waiting on this copy, layer by layer
        self.complete = False  # every byte is in the slot (on CUDA: the copy has finished on the GPU)
        self.started = self.finished = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.passed == len(self.bounds)

    def wait_layer(self, i: int) -> None:
        self.streaming = True
        self._wait(min(max(i + 1, 0), len(self.bounds) - 1))

    def wait(self) -> None:
        """Until the whole image is in the slot: on CUDA, until the copy has run on the GPU, not only
        until its last event is queued (the slot may be evicted, and a timer read, after this)."""
        self._wait(len(self.bounds) - 1)
        with self.cond:
            self.cond.wait_for(lambda: self.complete or self.error is not None)
        if self.error is not None:
            raise self.error

    def _wait(self, k: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.passed > k or self.error is not None)
        if self.error is not None:
            raise self.error
        if self.slot.events:
            torch.cuda.current_stream(self.slot.buf.device).wait_event(self.slot.events[k])


class DeviceTier:
    def __init__(self, device: torch.device, num_slots: int, slot_bytes: int, chunk: int = 64 << 20):
        self.device, self.chunk = device, chunk
        self.slot_bytes = -(-slot_bytes // PAGE) * PAGE
        self.buf = torch.empty(num_slots * self.slot_bytes, dtype=torch.uint8, device=device)
        if device.type == "cpu":
            self.buf.zero_()  # fault the pages in now: first touch costs more than the copy itself
        sb = self.slot_bytes
        self.slots = [Slot(i, self.buf[i * sb:(i + 1) * sb]) for i in range(num_slots)]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.bytes_copied, self.copy_seconds = 0, 0.0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="coe-copier", daemon=True)
        self._thread.start()

    def start(self, t: Transfer) -> Transfer:
        if t.slot.buf.device.type == "cuda":
            while len(t.slot.events) < len(t.bounds):  # only grows to the deepest expert seen
                t.slot.events.append(torch.cuda.Event())
        self._jobs.put(t)
        return t

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (t := self._jobs.get()) is not None:
            t.started = time.perf_counter()
            try:
                if self.stream is not None:
                    # Work already queued on the old occupant of the slot finishes before we overwrite it.
                    self.stream.wait_stream(torch.cuda.default_stream(self.device))
                    with torch.cuda.stream(self.stream):
                        self._copy(t)
                    t.slot.events[len(t.bounds) - 1].synchronize()  # the host bytes may be reused after this
                else:
                    self._copy(t)
            except Exception as e:  # noqa: BLE001 - handed to whoever waits on this transfer
                with t.cond:
                    t.error = e
                    t.cond.notify_all()
            t.finished = time.perf_counter()
            with t.cond:
                t.complete = t.error is None
                t.cond.notify_all()
            if t.error is None:
                self.bytes_copied += t.index.total_bytes
                self.copy_seconds += t.finished - t.started
            if t.on_done:
                t.on_done(t)

    def _copy(self, t: Transfer) -> None:
        total, pos, k = t.index.total_bytes, 0, 0
        dst, src, cuda = t.slot.buf, t.src, self.stream is not None
        while pos < total:
            hi = min(pos + self.chunk, total)
            if t.streaming:  # split at layer ends: the waiting forward pass gets each layer sooner
                hi = min(hi, t.bounds[k])
            with t.cond:
                t.cond.wait_for(lambda: t.source.prefix >= hi or t.source.error is not None)
            if t.source.error is not None:
                raise t.source.error
            # One core copies while a forward pass streams behind the copy or a disk read is still
            # arriving (then the loaders checksum on the other core); every core once it all waits.
            _copy_chunk(dst[pos:hi], src[pos:hi], cuda, t.streaming or not t.source.ready)
            pos = hi
            passed = k
            while passed < len(t.bounds) and t.bounds[passed] <= pos:
                if cuda:
                    t.slot.events[passed].record(self.stream)
                passed += 1
            if passed != k:
                with t.cond:
                    t.passed = k = passed
                    t.cond.notify_all()


def _copy_chunk(dst: torch.Tensor, src: torch.Tensor, cuda: bool, one_core: bool) -> None:
    if one_core and not cuda:
        # Other work runs beside this copy on the CPU: one core copies (memmove, without the GIL) and
        # leaves the rest to it. torch's copy_ would take every core, stalling a forward pass's threads
        # at each barrier, so streaming gained nothing (bench/switch.py, case (f)).
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel())
    else:
        dst.copy_(src, non_blocking=cuda)
