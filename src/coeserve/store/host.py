"""The host tier: one RAM arena allocated once at start (page-locked once on CUDA machines) that holds
expert images at page-aligned offsets, and `DiskRead`, which fills a region of it from an expert's
image file with large parallel reads (O_DIRECT where the filesystem allows), verifying each checksum
chunk and publishing how long the verified prefix is, so a device copy can follow right behind it.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from concurrent.futures import Executor
from pathlib import Path

import torch

from coeserve.formats.image import ImageError, ImageIndex, ImageReplaced, check_size, chunk_checksum, file_id

PAGE = 4096


class HostArena:
    """A fixed byte budget as one buffer, handed out by first fit; freed ranges coalesce."""

    def __init__(self, nbytes: int, pin: bool = False):
        self.capacity = -(-nbytes // PAGE) * PAGE
        raw = torch.empty(self.capacity + PAGE, dtype=torch.uint8)
        skew = (-raw.data_ptr()) % PAGE  # page-aligned: O_DIRECT reads land straight in the arena
        self._raw, self.buf = raw, raw[skew: skew + self.capacity]
        self.pinned = pin and _register(self.buf)
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted (offset, size)

    @property
    def used(self) -> int:
        return self.capacity - sum(s for _, s in self._free)

    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)

    def alloc(self, size: int) -> int | None:
        size = -(-size // PAGE) * PAGE
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                self._free[i: i + 1] = [(off + size, free - size)] if free > size else []
                return off
        return None

    def release(self, off: int, size: int) -> None:
        size = -(-size // PAGE) * PAGE
        i = bisect.bisect(self._free, (off, 0))
        self._free.insert(i, (off, size))
        merged: list[tuple[int, int]] = []
        for o, s in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self._free = merged

    def view(self, off: int, size: int) -> torch.Tensor:
        return self.buf[off: off + size]

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False


def _register(buf: torch.Tensor) -> bool:
    """Page-lock the arena in place (cudaHostRegister), once: pin_memory() would round the size up to
    a power of two and allocate anew."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    return int(err) == 0


class DiskRead:
    """One image file → a host buffer, read in `block`s spread over the loader threads in file order
    (so the verified prefix grows chunk by chunk and a copy right behind it waits on one chunk at the
    end, not on as many chunks as there are threads); the thread that reads a chunk's last block
    verifies that chunk's checksum while the others read on.

    `prefix` is the number of leading bytes read and verified; `error` is set (and `prefix` stops)
    if the file is missing, short or corrupted (at once, for a missing file: check it after creating).
    `on_change` is called after every chunk, on a loader thread."""

    def __init__(self, directory: Path, index: ImageIndex, out: torch.Tensor, pool: Executor,
                 block: int = 8 << 20, direct: bool = True, on_change=None, file: tuple[int, int] | None = None):
        """`file`: the `file_id` of image.bin when its index was read; another file there now fails with
        ImageReplaced (a re-import swapped the directory in between), not with a checksum mismatch."""
        self.path, self.index, self.out, self.block, self.file = directory / "image.bin", index, out, block, file
        self.on_change = on_change
        self.prefix, self.error = 0, None
        self.started, self.seconds, self.counted = time.perf_counter(), 0.0, False
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._left = 0
        n = -(-index.total_bytes // index.chunk_bytes)
        try:
            check_size(directory, index)
            if len(index.chunk_crcs) != n:
                raise ImageError(f"{directory / 'index.json'}: {len(index.chunk_crcs)} checksums for {n} chunks")
            self._fd, self.direct = _open(self.path, direct and out.data_ptr() % PAGE == 0)
            try:
                self._check_file()
            except ImageReplaced:
                os.close(self._fd)
                raise
        except (ImageError, OSError) as e:
            self._fail(e if isinstance(e, ImageError) else ImageError(f"{self.path}: {e.strerror}"))
            return
        self._left = n
        spans = [self._span(i) for i in range(n)]
        blocks = [(i, b, min(b + block, hi)) for i, (lo, hi) in enumerate(spans) for b in range(lo, hi, block)]
        self._blocks_left = [0] * n
        for i, _, _ in blocks:
            self._blocks_left[i] += 1
        for b in blocks:
            pool.submit(self._block, *b)

    @property
    def ready(self) -> bool:
        return self.error is None and self.prefix >= self.index.total_bytes

    @property
    def settled(self) -> bool:
        """No loader thread touches the buffer any more (done, or failed and every chunk abandoned)."""
        return self._left == 0

    def _block(self, i: int, lo: int, hi: int) -> None:
        try:
            if self.error is None:
                self._read(lo, hi)
        except ImageError as e:
            self._fail(e)
        except OSError as e:
            self._fail(ImageError(f"{self.path}: read failed: {e.strerror or e}"))
        with self._lock:
            self._blocks_left[i] -= 1
            last = self._blocks_left[i] == 0
        if last:
            self._verify(i)
            self._finish_chunk(i)

    def _span(self, i: int) -> tuple[int, int]:
        """Checksum chunk i's bytes."""
        lo = i * self.index.chunk_bytes
        return lo, min(lo + self.index.chunk_bytes, self.index.total_bytes)

    def _verify(self, i: int) -> None:
        lo, hi = self._span(i)
        if self.error is None:
            crc = chunk_checksum(self.index, memoryview(self.out.numpy())[lo:hi])
            if crc != self.index.chunk_crcs[i]:
                self._fail(ImageError(f"{self.path}: checksum mismatch in chunk {i} (bytes {lo}..{hi}); "
                                      "the image is corrupted, re-import the expert"))

    def _read(self, lo: int, hi: int) -> None:
        mv = memoryview(self.out.numpy())
        pos = lo
        while pos < hi:
            end = min(pos + self.block, hi)
            try:
                n = os.preadv(self._fd, [mv[pos:end]], pos)
            except OSError:
                if not self.direct:
                    raise
                self._fallback()
                continue
            if n <= 0:
                raise ImageError(f"{self.path}: ended after {pos} bytes (truncated while loading)")
            pos += n

    def _check_file(self) -> None:
        if self.file is not None and file_id(self._fd) != self.file:
            raise ImageReplaced(f"{self.path}: replaced since its index was read (re-imported)")

    def _fallback(self) -> None:
        """O_DIRECT refused mid-read (some filesystems accept the flag, then not the read): buffered."""
        with self._lock:
            if self.direct:
                self.direct = False
                old, self._fd = self._fd, os.open(self.path, os.O_RDONLY)
                os.close(old)
                self._check_file()

    def _finish_chunk(self, i: int) -> None:
        with self._lock:
            self._done.add(i)
            cb = self.index.chunk_bytes
            while self.error is None and self.prefix < self.index.total_bytes and self.prefix // cb in self._done:
                self.prefix = min(self.prefix + cb, self.index.total_bytes)
            self._left -= 1
            if self._left == 0:
                os.close(self._fd)
                self.seconds = time.perf_counter() - self.started
        if self.on_change:
            self.on_change(self)

    def _fail(self, err: ImageError) -> None:
        with self._lock:
            if self.error is None:
                self.error = err


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # e.g. tmpfs: no O_DIRECT, read through the page cache
    return os.open(path, os.O_RDONLY), False
