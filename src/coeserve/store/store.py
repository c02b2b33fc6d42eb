"""The three tiers behind narrow verbs: `can_load / load / evict / pin / unpin / prefetch`, and `use`,
which hands out an expert whose parameters are views into its device slot.

An expert's bytes move disk → host arena (DiskRead, on the loader threads) → device slot (Transfer, on
the copier thread), the device copy following the disk read chunk by chunk. One lock guards the
bookkeeping and is never held while bytes move, so a compute step waits only for the layers of the
expert it runs (`Decoder.layer_ready`)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from coeserve.config import ModelConfig, StoreConfig
from coeserve.engine.engine import Expert
from coeserve.engine.load import bind_image, load_codec, pick_device, pick_dtype
from coeserve.formats.image import ImageIndex, ImageReplaced, dtype_name
from coeserve.models import build_model
from coeserve.store.budget import resolve_budgets
from coeserve.store.device import DeviceTier, Slot, Transfer
from coeserve.store.disk import DiskStore, ExpertNotFound
from coeserve.store.host import DiskRead, HostArena
from coeserve.store.policy import make_policy


class StoreFull(RuntimeError):
    """An expert cannot fit a tier at all, or every byte of it is pinned and the caller won't wait."""


@dataclass
class _Entry:
    name: str
    index: ImageIndex
    cfg: ModelConfig
    dir: Path  # where the image in the compute dtype lives
    file: tuple[int, int] | None  # which file image.bin was when the index was read (None: missing)
    host_off: int | None = None
    read: DiskRead | None = None  # the host copy: in flight, complete, or failed
    slot: Slot | None = None
    transfer: Transfer | None = None
    pins: int = 0
    busy: int = 0  # device copies reading the host copy
    codec: object = None

    @property
    def nbytes(self) -> int:
        return self.index.total_bytes


class ExpertStore:
    def __init__(self, disk: DiskStore, config: StoreConfig = StoreConfig(), device: str = "auto",
                 dtype: str = "auto", max_len: int | None = None, check: bool = False):
        self.disk, self.config, self.max_len, self._check_every = disk, config, max_len, check
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.budgets = resolve_budgets(config, disk, self.device, dtype_name(self.dtype))
        self.host = HostArena(self.budgets.host_bytes, pin=self.device.type == "cuda")
        self.dev = DeviceTier(self.device, self.budgets.device_slots, self.budgets.slot_bytes, config.chunk_bytes)
        self.pool = ThreadPoolExecutor(config.loaders, thread_name_prefix="coe-loader")
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict[str, _Entry] = {}
        self.host_policy = make_policy(config.policy, cost=self._cost_to_host)
        self.dev_policy = make_policy(config.policy, cost=self._cost_to_device)
        self.stats = {"switches": 0, "disk_loads": 0, "disk_bytes": 0, "disk_seconds": 0.0,
                      "host_evictions": 0, "device_evictions": 0}

    # -- verbs ----------------------------------------------------------------------------------
    def load(self, name: str, tier: str = "device", wait: bool = True, evict: bool = True):
        """Start bringing `name` into `tier` (evicting by policy as needed) and return the DiskRead or
        Transfer that tracks it. wait=False raises StoreFull instead of waiting for a pinned tier;
        evict=False takes only an empty device slot."""
        if tier not in ("host", "device"):
            raise ValueError(f"unknown tier {tier!r} (host or device)")
        with self._cond:
            e = self._entry(name)
            self.host_policy.touch(name)
            if tier == "device":
                self.dev_policy.touch(name)
            while True:  # a wait releases the lock, so after one everything is looked at again
                self._ensure_host(e, wait)
                if tier == "host" or self._ensure_device(e, wait, evict):
                    break
            self._audit()
            return e.transfer if tier == "device" else e.read

    def prefetch(self, name: str) -> bool:
        """Start loading `name` and return at once: into an empty device slot if there is one (a
        prefetch never evicts an expert that may be about to run), else into the host tier."""
        for tier, evict in (("device", False), ("host", True)):
            try:
                self.load(name, tier, wait=False, evict=evict)
                return True
            except StoreFull:
                continue
            except (ValueError, LookupError):
                return False
        return False

    def can_load(self, name: str, tier: str = "device") -> bool:
        with self._cond:
            e = self._entry(name)
            host_ok = self._host_ready(e) or e.nbytes <= self.host.largest_free() + sum(
                v.nbytes for v in self._host_victims(e))
            if tier == "host":
                return host_ok
            return host_ok and (e.slot is not None or (e.nbytes <= self.dev.slot_bytes and self._free_slot() is not None))

    def evict(self, name: str, tier: str = "device") -> None:
        with self._cond:
            e = self._entries.get(name)
            if e is None:
                return
            if e.pins:
                raise StoreFull(f"expert {name!r} is pinned (in use); it cannot be evicted")
            if tier == "device" and e.slot is not None:
                if not e.transfer.complete:
                    raise StoreFull(f"expert {name!r} is still being copied to the device")
                self._drop_device(e)
            elif tier == "host" and e.read is not None:
                if e.busy or not e.read.settled:
                    raise StoreFull(f"expert {name!r} is still being read or copied")
                self._drop_host(e)
            self._audit()

    def pin(self, name: str) -> None:
        with self._cond:
            self._entry(name).pins += 1

    def unpin(self, name: str) -> None:
        with self._cond:
            e = self._entries[name]
            e.pins = max(0, e.pins - 1)
            self._cond.notify_all()

    def acquire(self, name: str) -> Expert:
        """The expert on the device, pinned until `release(name)`. Its weights may still be arriving:
        the forward pass waits layer by layer (layer streaming)."""
        with self._cond:
            t = self.load(name, "device")
            e = self._entries[name]
            e.pins += 1
            model = e.slot.model
        try:
            model.layer_ready = None if t.complete else t.wait_layer
            codec = self.codec(name)
        except BaseException:
            self.unpin(name)
            raise
        return Expert(name, e.cfg, model, codec, self.device, self.dtype, e.file)

    def codec(self, name: str):
        """The expert's tokenizer (None: it has none), loaded once: the one its acquired Expert carries."""
        with self._cond:
            e = self._entry(name)
        if e.codec is None:
            e.codec = load_codec(self.disk, name, e.cfg) or False
        return e.codec or None

    def release(self, name: str) -> None:
        self.unpin(name)

    @contextmanager
    def use(self, name: str) -> Iterator[Expert]:
        """`acquire` for the length of a block."""
        expert = self.acquire(name)
        try:
            yield expert
        finally:
            self.release(name)

    def switch_cost(self, name: str) -> float:
        """Estimated seconds to bring `name` into a device slot from where it is now."""
        with self._cond:
            e = self._entry(name)
            return 0.0 if e.slot is not None else self._cost_to_device(name)

    def resident(self, tier: str = "device") -> list[str]:
        with self._cond:
            if tier == "device":
                return [s.owner for s in self.dev.slots if s.owner is not None]
            return [e.name for e in self._entries.values() if e.read is not None]

    def close(self) -> None:
        self.dev.close()
        self.pool.shutdown(wait=True)
        self.host.close()

    # -- host tier ------------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is not None:  # a failed load is retried from disk (the image may have been fixed)
            if e.transfer is not None and e.transfer.error is not None and e.transfer.finished is not None:
                self._drop_device(e)
            if e.read is not None and e.read.error is not None and e.read.settled and not e.busy:
                self._drop_host(e)
        if e is None:
            if not self.disk.exists(name):
                raise ExpertNotFound(name)
            e = self._entries[name] = _Entry(name, *self._image(name))
        elif e.read is None and e.slot is None and not e.busy:  # not resident: the files may be new
            e.index, e.cfg, e.dir, e.file = self._image(name)
        return e

    def _image(self, name: str):
        return self.disk.snapshot(name, dtype_name(self.dtype))

    def _host_ready(self, e: _Entry) -> bool:
        return e.read is not None and e.read.error is None

    def _ensure_host(self, e: _Entry, wait: bool) -> None:
        for attempt in range(3):
            try:
                return self._start_read(e, wait)
            except ImageReplaced:  # re-imported since its index was read: read the new one
                if attempt == 2 or e.slot is not None:
                    raise
                e.index, e.cfg, e.dir, e.file = self._image(e.name)

    def _start_read(self, e: _Entry, wait: bool) -> None:
        while True:
            if self._host_ready(e):
                return
            if e.read is not None:  # failed, still settling
                raise e.read.error
            if e.nbytes > self.host.capacity:
                raise StoreFull(f"expert {e.name!r} needs {e.nbytes / 2**20:.0f} MiB; the host arena holds "
                                f"{self.host.capacity / 2**20:.0f} MiB (raise --host-memory)")
            off = self.host.alloc(e.nbytes)
            if off is not None:
                break
            victims = self._host_victims(e)
            if victims:
                self._drop_host(victims[0])
            elif wait:
                self._cond.wait()
            else:
                raise StoreFull(f"no host memory free for expert {e.name!r} right now")
        e.host_off = off
        e.read = DiskRead(e.dir, e.index, self.host.view(off, e.nbytes), self.pool, self.config.read_block,
                          self.config.direct_io, on_change=self._read_progress, file=e.file)
        if e.read.error is not None:
            err = e.read.error
            self._drop_host(e)
            raise err
        self.stats["disk_loads"] += 1

    def _host_victims(self, e: _Entry) -> list[_Entry]:
        ok = [v for v in self._entries.values()
              if v is not e and v.read is not None and v.read.settled and not v.pins and not v.busy]
        failed = [v for v in ok if v.read.error is not None]
        off_device = [v.name for v in ok if v.slot is None and v.read.error is None]
        on_device = [v.name for v in ok if v.slot is not None and v.read.error is None]
        order = self.host_policy.order(off_device) + self.host_policy.order(on_device)
        return failed + [self._entries[n] for n in order]

    def _drop_host(self, e: _Entry) -> None:
        if e.read is not None and e.read.error is None:
            self.stats["host_evictions"] += 1
        self.host.release(e.host_off, e.nbytes)
        e.host_off, e.read = None, None
        self._cond.notify_all()

    def _read_progress(self, read: DiskRead) -> None:
        with self._cond:
            if read.ready and not read.counted:
                read.counted = True
                self.stats["disk_bytes"] += read.index.total_bytes
                self.stats["disk_seconds"] += read.seconds
            self._cond.notify_all()

    # -- device tier ----------------------------------------------------------------------------
    def _ensure_device(self, e: _Entry, wait: bool, evict: bool = True) -> bool:
        """Start the copy into a slot; False if it had to wait for one (the caller starts over)."""
        if e.slot is not None:
            if e.transfer.error is None:
                return True
            err = e.transfer.error
            self._drop_device(e)  # the copy failed (its disk read did): the next load starts over
            raise err
        if e.nbytes > self.dev.slot_bytes:
            raise StoreFull(f"expert {e.name!r} needs {e.nbytes / 2**20:.0f} MiB; device slots hold "
                            f"{self.dev.slot_bytes / 2**20:.0f} MiB (size slots for the largest expert)")
        slot = self._free_slot(evict)
        if slot is None:
            if not wait:
                raise StoreFull(f"every device slot is in use; cannot bring in {e.name!r} now")
            self._cond.wait()
            return False
        if slot.owner is not None:
            self._drop_device(self._entries[slot.owner])
        e.busy += 1
        e.transfer = Transfer(slot, self.host.view(e.host_off, e.nbytes), e.index, e.read, self._cond,
                              self.dev.chunk, on_done=lambda t, e=e: self._copied(e))
        slot.owner, e.slot = e.name, slot
        self.stats["switches"] += 1
        self.dev.start(e.transfer)
        self._bind(e, slot)  # while the first bytes move
        return True

    def _free_slot(self, evict: bool = True) -> Slot | None:
        empty = [s for s in self.dev.slots if s.owner is None]
        if empty or not evict:
            return empty[0] if empty else None
        done = [self._entries[s.owner] for s in self.dev.slots]
        failed = [e for e in done if e.transfer.error is not None and e.transfer.finished is not None]
        if failed:
            return failed[0].slot
        ok = [e.name for e in done if not e.pins and e.transfer.complete]
        return self._entries[self.dev_policy.order(ok)[0]].slot if ok else None

    def _bind(self, e: _Entry, slot: Slot) -> None:
        """Point a model at the slot's bytes; a model object is reused across experts of one config."""
        m = slot.model
        if m is None or m.cfg != e.cfg:
            m = build_model(e.cfg, max_len=self.max_len)
            m.to_device(self.device)
            slot.model = m
        bind_image(m, slot.buf, e.index, self.dtype)

    def _copied(self, e: _Entry) -> None:
        with self._cond:
            e.busy -= 1
            self._cond.notify_all()

    def _drop_device(self, e: _Entry) -> None:
        if e.transfer.error is None:
            self.stats["device_evictions"] += 1
        e.slot.owner, e.slot, e.transfer = None, None, None
        self._cond.notify_all()

    # -- costs and invariants -------------------------------------------------------------------
    def _bandwidths(self) -> tuple[float, float]:
        s = self.stats
        disk = s["disk_bytes"] / s["disk_seconds"] if s["disk_seconds"] else 1e9
        copy = self.dev.bytes_copied / self.dev.copy_seconds if self.dev.copy_seconds else 10e9
        return disk, copy

    def _cost_to_host(self, name: str) -> float:
        return self._entries[name].nbytes / self._bandwidths()[0]

    def _cost_to_device(self, name: str) -> float:
        e = self._entries[name]
        disk, copy = self._bandwidths()
        return e.nbytes / copy + (0.0 if self._host_ready(e) else e.nbytes / disk)

    def check(self) -> None:
        """Raise if a budget is exceeded or the bookkeeping disagrees with itself."""
        with self._cond:
            regions = sorted((e.host_off, e.nbytes, e.name) for e in self._entries.values() if e.read is not None)
            used = sum(-(-n // 4096) * 4096 for _, n, _ in regions)
            if used != self.host.used or used > self.host.capacity:
                raise RuntimeError(f"host tier: {used} bytes held, arena says {self.host.used} of {self.host.capacity}")
            for (o1, n1, a), (o2, _, b) in zip(regions, regions[1:]):
                if o1 + n1 > o2:
                    raise RuntimeError(f"host tier: {a} and {b} overlap")
            on_dev = [e for e in self._entries.values() if e.slot is not None]
            if len(on_dev) > len(self.dev.slots) or any(e.slot.owner != e.name or e.nbytes > self.dev.slot_bytes
                                                        for e in on_dev):
                raise RuntimeError("device tier: slot bookkeeping is inconsistent")

    def _audit(self) -> None:
        if self._check_every:
            self.check()
