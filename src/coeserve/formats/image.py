"""The expert image: one contiguous, aligned byte image of every tensor an expert needs, plus an index
(name, dtype, shape, offset) and per-chunk checksums (xxh3-64; CRC32 in images written before). The same layout is used on disk, in host RAM
and in a device slot, so moving an expert between tiers is one big copy.

Tensors are laid out in execution order (embedding, layer 0 … layer N-1, final norm, head) and the
index records where each layer ends, so a reader can start layer i as soon as its bytes have arrived.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

ALIGN = 256  # bytes; a CUDA allocation's alignment, so every tensor view is aligned on device too
FILE_ALIGN = 4096  # the image's size is padded to a page so O_DIRECT reads of the whole file work
CHUNK = 64 << 20  # checksum granularity, also the copy chunk of a switch
IMAGE_FILE, INDEX_FILE = "image.bin", "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The image's name for a torch dtype ("fp32", "bf16", "fp16")."""
    return _DTYPE_NAMES[dtype]


class ImageError(ValueError):
    """A missing, truncated or corrupted image; the message names the file and the reason."""


class ImageReplaced(ImageError):
    """The image file is not the one whose index was read: the expert was re-imported in between."""


def file_id(path: Path | int) -> tuple[int, int]:
    """(device, inode) of a file, by path or open descriptor: which file, not which name."""
    st = os.fstat(path) if isinstance(path, int) else os.stat(path)
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ImageIndex:
    tensors: tuple[TensorEntry, ...]
    total_bytes: int
    layer_ends: tuple[int, ...]  # byte offset where the prelude (embedding) and each layer end
    chunk_bytes: int
    chunk_crcs: tuple[int, ...]  # one checksum per chunk, by `algo`
    algo: str = "xxh3_64"

    def to_json(self) -> str:
        d = {"format": "coe-image", "version": 1, "alignment": ALIGN, "total_bytes": self.total_bytes,
             "layer_ends": list(self.layer_ends),
             "checksum": {"algo": self.algo, "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunk_crcs)},
             "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                          "nbytes": t.nbytes} for t in self.tensors]}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ImageIndex":
        d = json.loads(text)
        if d.get("format") != "coe-image" or d.get("version") != 1:
            raise ValueError("not a version-1 coe image index")
        tensors = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in d["tensors"])
        ck = d["checksum"]
        if ck.get("algo", "crc32") not in CHECKSUMS:
            raise ValueError(f"unknown checksum {ck.get('algo')!r}")
        return cls(tensors, d["total_bytes"], tuple(d["layer_ends"]), ck["chunk_bytes"], tuple(ck["chunks"]),
                   ck.get("algo", "crc32"))


def _xxh3(data) -> int:
    import xxhash
    return xxhash.xxh3_64_intdigest(data)


# xxh3 checks a chunk about 5x faster than zlib's CRC32 on the CPUs we measured (so a cold load runs at
# disk speed); CRC32 stays readable for images written before.
CHECKSUMS = {"xxh3_64": _xxh3, "crc32": zlib.crc32}


def chunk_checksum(index: "ImageIndex", data) -> int:
    return CHECKSUMS[index.algo](data)


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def write_image(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: str,
                layer_of: Callable[[str], int]) -> ImageIndex:
    """Write tensors (in order) to directory/image.bin; float tensors are cast to `dtype`.

    `layer_of` maps a tensor name to its layer (-1 = before the first layer, num_layers = after the
    last); tensors must arrive in non-decreasing layer order.
    """
    entries, layer_ends, offset, last_layer = [], [], 0, -1
    path = directory / IMAGE_FILE
    with open(path, "wb") as f:
        for name, t in tensors:
            layer = layer_of(name)
            if layer < last_layer:
                raise ValueError(f"tensor {name} arrives after a later layer")
            while last_layer < layer:
                layer_ends.append(offset)
                last_layer += 1
            if t.is_floating_point():
                t = t.to(DTYPES[dtype])
            data = t.contiguous().view(torch.uint8).reshape(-1).numpy()
            f.seek(offset)
            f.write(data.tobytes() if not data.flags.c_contiguous else memoryview(data))
            entries.append(TensorEntry(name, _DTYPE_NAMES[t.dtype], tuple(t.shape), offset, data.nbytes))
            offset = _align(offset + data.nbytes)
        total = _align(offset, FILE_ALIGN)
        f.truncate(total)
    crcs = checksum_file(path, total)
    return ImageIndex(tuple(entries), total, tuple(layer_ends), CHUNK, tuple(crcs))


def cast_bytes(index: ImageIndex, dtype: str) -> int:
    """The total_bytes that `write_image` gives this image's tensors cast to `dtype` (its layout rules)."""
    offset, size = 0, DTYPES[dtype].itemsize
    for t in index.tensors:
        offset = _align(offset + t.nbytes // DTYPES[t.dtype].itemsize * size)
    return _align(offset, FILE_ALIGN)


def checksum_file(path: Path, total: int) -> list[int]:
    crcs = []
    with open(path, "rb") as f:
        for _ in range(0, total, CHUNK):
            crcs.append(CHECKSUMS["xxh3_64"](f.read(CHUNK)))
    return crcs


def read_index(directory: Path) -> ImageIndex:
    path = directory / INDEX_FILE
    try:
        return ImageIndex.from_json(path.read_text())
    except FileNotFoundError:
        raise ImageError(f"{path}: missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(f"{path}: corrupted index ({e})") from None


def check_size(directory: Path, index: ImageIndex) -> Path:
    path = directory / IMAGE_FILE
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: missing") from None
    if size != index.total_bytes:
        raise ImageError(f"{path}: size {size} bytes, index says {index.total_bytes} (truncated or replaced)")
    return path


def verify_chunks(path: Path, buf: torch.Tensor, index: ImageIndex, chunks: Iterable[int] | None = None) -> None:
    """Check the checksums of the given chunks (default: all) of an image held in `buf` (uint8)."""
    view = buf.numpy()
    for i in (range(len(index.chunk_crcs)) if chunks is None else chunks):
        lo = i * index.chunk_bytes
        got = chunk_checksum(index, view[lo:lo + index.chunk_bytes])
        if got != index.chunk_crcs[i]:
            raise ImageError(f"{path}: checksum mismatch in chunk {i} (bytes {lo}..{lo + index.chunk_bytes}); "
                             "the image is corrupted, re-import the expert")


def load_image(directory: Path, out: torch.Tensor | None = None, verify: bool = True) -> tuple[ImageIndex, torch.Tensor]:
    """Read an image from disk into `out` (a uint8 buffer of at least total_bytes) or a new buffer."""
    index = read_index(directory)
    path = check_size(directory, index)
    buf = torch.empty(index.total_bytes, dtype=torch.uint8) if out is None else out[: index.total_bytes]
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(buf.numpy())
        got = 0
        while got < index.total_bytes:
            n = f.readinto(mv[got: got + CHUNK])
            if not n:
                raise ImageError(f"{path}: ended after {got} bytes")
            got += n
    if verify:
        verify_chunks(path, buf, index)
    return index, buf


def map_image(directory: Path) -> tuple[ImageIndex, torch.Tensor]:
    """An image's bytes mapped from its file (copy-on-write, read as touched) and verified, for reading
    an image far larger than RAM once."""
    import numpy as np

    index = read_index(directory)
    path = check_size(directory, index)
    buf = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(index.total_bytes,)))
    verify_chunks(path, buf, index)
    return index, buf


def tensor_views(buf: torch.Tensor, index: ImageIndex) -> dict[str, torch.Tensor]:
    """Views (no copies) of every tensor inside an image buffer, on whatever device `buf` lives."""
    out = {}
    for t in index.tensors:
        raw = buf[t.offset: t.offset + t.nbytes]
        out[t.name] = raw.view(DTYPES[t.dtype]).view(t.shape)
    return out
