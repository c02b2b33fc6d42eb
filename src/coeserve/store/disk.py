"""The disk tier: one directory per imported expert under `<home>/experts/NAME/` holding the expert
image (image.bin + index.json), our model config, metadata and tokenizer files, and `cast/DTYPE/`, the
image cast to another compute dtype, written the first time the expert runs in that dtype.

Imports (and casts) are written to a temporary directory beside the target and renamed into place at
the end, so an interrupted or failed import leaves nothing half-written.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coeserve.config import ModelConfig
from coeserve.formats import convert, image
from coeserve.formats.checkpoint import Checkpoint, ImportError_

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE, META_FILE, TOKENIZER_DIR, CAST_DIR = "config.json", "meta.json", "tokenizer", "cast"


class ExpertNotFound(LookupError):
    def __str__(self) -> str:
        return f"expert {self.args[0]!r} is not installed (see `coe experts`, `coe pull`, `coe import`)"


@dataclass(frozen=True)
class ExpertInfo:
    name: str
    arch: str
    params: int
    dtype: str
    bytes: int
    source: str
    path: Path


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid expert name {name!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return name


def open_source(source: Path) -> Checkpoint:
    from coeserve.formats.gguf import read_gguf
    from coeserve.formats.hf import read_hf_dir

    if not source.exists():
        raise ImportError_(f"{source}: no such file or directory")
    if source.is_dir():
        return read_hf_dir(source)
    return read_gguf(source)


class DiskStore:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = self.home / "experts"

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / META_FILE).is_file()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # Only valid names: `.NAME.xxxx` is the temp dir of an import in progress (or of one killed
        # between writing meta.json and the final rename), not an expert.
        return sorted(p.name for p in self.root.iterdir()
                      if NAME_RE.match(p.name) and ".." not in p.name and (p / META_FILE).is_file())

    def info(self, name: str) -> ExpertInfo:
        p = self.path(name)
        try:
            meta = json.loads((p / META_FILE).read_text())
        except FileNotFoundError:
            raise ExpertNotFound(name) from None
        return ExpertInfo(name, meta["arch"], meta["params"], meta["dtype"], meta["bytes"], meta["source"], p)

    def config(self, name: str) -> ModelConfig:
        try:
            return ModelConfig.from_dict(json.loads((self.path(name) / CONFIG_FILE).read_text()))
        except FileNotFoundError:
            raise ExpertNotFound(name) from None

    def image_dir(self, name: str, dtype: str, on_cast: Callable[[str, str], None] | None = None) -> Path:
        """The directory of `name`'s image in `dtype`: the imported one, or else its copy cast to `dtype`,
        made on first use. Every tier then holds the very bytes the model runs on, so a switch stays one
        copy and parameters stay views (a cast at bind time would allocate, and would read a slot that
        the copier is still filling)."""
        info = self.info(name)
        if info.dtype == dtype:
            return info.path
        target = info.path / CAST_DIR / dtype
        if not (target / image.INDEX_FILE).is_file():
            if on_cast:
                on_cast(name, dtype)
            try:
                self._cast(name, target, dtype)
            except OSError as e:
                raise image.ImageError(f"{target}: cannot write expert {name!r} cast to {dtype} ({e.strerror or e}); "
                                       f"run it in {info.dtype} (--dtype {info.dtype}) or re-import it with "
                                       f"--dtype {dtype}") from None
        return target

    def snapshot(self, name: str, dtype: str) -> tuple[image.ImageIndex, ModelConfig, Path, tuple[int, int] | None]:
        """The index, config, directory and image file (`image.file_id`; None if missing) of `name`'s image
        in `dtype`, read between two looks at which file image.bin is, so that all four belong to one
        import even while a re-import swaps the expert's directory."""
        for attempt in range(3):
            try:
                d = self.image_dir(name, dtype)
                before = _file_id(d)
                index, cfg = image.read_index(d), self.config(name)
                if _file_id(d) == before:
                    return index, cfg, d, before
            except (image.ImageError, FileNotFoundError):
                if attempt == 2:
                    raise
        raise image.ImageError(f"{self.path(name)}: replaced while being read, three times")

    def image_bytes(self, name: str, dtype: str) -> int:
        """The size of `name`'s image in `dtype`, cast or not yet."""
        info = self.info(name)
        return info.bytes if info.dtype == dtype else image.cast_bytes(image.read_index(info.path), dtype)

    def _cast(self, name: str, target: Path, dtype: str) -> None:
        if dtype not in image.DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(image.DTYPES)})")
        cfg, src = self.config(name), self.path(name)
        target.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dtype}.", dir=target.parent))
        try:
            index, buf = image.map_image(src)
            views = image.tensor_views(buf, index)
            cast = image.write_image(tmp, ((t.name, views[t.name]) for t in index.tensors), dtype,
                                     lambda n: convert.layer_of(n, cfg))
            (tmp / image.INDEX_FILE).write_text(cast.to_json())
            tmp.chmod(0o755)
            try:
                tmp.rename(target)
            except OSError:
                if not (target / image.INDEX_FILE).is_file():  # else another process cast it first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def import_source(self, source: Path, name: str, dtype: str = "fp32",
                      progress: Callable[[int, int], None] | None = None, label: str | None = None) -> ExpertInfo:
        """Import an HF directory or a GGUF file as expert `name` (replacing an existing one)."""
        check_name(name)
        if dtype not in image.DTYPES:
            raise ImportError_(f"unknown dtype {dtype!r} (choose from {', '.join(image.DTYPES)})")
        ck = open_source(Path(source))
        try:
            cfg = convert.model_config(ck.hf_config, str(source))
            tensors = _counted(convert.baked_tensors(ck, cfg), cfg, progress)
            return self.add(name, cfg, tensors, dtype, label or str(source), ck.tokenizer_dir)
        finally:
            ck.close()

    def add(self, name: str, cfg: ModelConfig, tensors, dtype: str, source: str,
            tokenizer_dir: Path | None = None) -> ExpertInfo:
        """Write an expert from (name, tensor) pairs in image order, atomically (temp dir, then rename)."""
        check_name(name)
        if dtype not in image.DTYPES:
            raise ImportError_(f"unknown dtype {dtype!r} (choose from {', '.join(image.DTYPES)})")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            self._write(tmp, tensors, cfg, name, dtype, source, tokenizer_dir)
            tmp.chmod(0o755)
            self._swap_in(tmp, self.path(name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.info(name)

    def remove(self, name: str) -> ExpertInfo:
        """Delete an expert (its casts included). It is first renamed out of sight, so no reader ever
        finds half of it; a server that has it open keeps reading the files it holds until it lets go."""
        info = self.info(name)  # ExpertNotFound if absent
        gone = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=self.root))
        gone.rmdir()
        self.path(name).rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
        return info

    def _swap_in(self, new: Path, final: Path) -> None:
        """Replace `final` by `new` so that a crash at any point leaves one complete expert there."""
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=self.root))
            old.rmdir()
            final.rename(old)
        new.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _write(self, d: Path, tensors, cfg: ModelConfig, name: str, dtype: str, label: str,
               tokenizer_dir: Path | None) -> None:
        params = 0

        def counted():
            nonlocal params
            for n, t in tensors:
                params += t.numel()
                yield n, t

        index = image.write_image(d, counted(), dtype, lambda n: convert.layer_of(n, cfg))
        (d / image.INDEX_FILE).write_text(index.to_json())
        (d / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
        if tokenizer_dir:
            from coeserve.formats.hf import TOKENIZER_FILES
            (d / TOKENIZER_DIR).mkdir()
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).is_file():
                    shutil.copy2(tokenizer_dir / f, d / TOKENIZER_DIR / f)
        meta = {"name": name, "arch": cfg.arch, "params": params, "dtype": dtype, "bytes": index.total_bytes,
                "source": label, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (d / META_FILE).write_text(json.dumps(meta, indent=1))


def _file_id(directory: Path) -> tuple[int, int] | None:
    try:
        return image.file_id(directory / image.IMAGE_FILE)
    except FileNotFoundError:
        return None  # the reader reports it, naming the file


def _counted(tensors, cfg: ModelConfig, progress):
    """Report (tensors done, tensors in all) as they stream past."""
    if progress is None:
        yield from tensors
        return
    from coeserve.models import build_model
    total = len(build_model(cfg, max_len=1).param_names())
    for count, item in enumerate(tensors, 1):
        progress(min(count, total), total)
        yield item
