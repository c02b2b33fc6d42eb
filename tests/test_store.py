"""The three-tier store on CPU: switching correctness (bitwise), many experts under tight budgets from
several threads, failures confined to one expert, the verbs, layer streaming, and steady memory."""
from __future__ import annotations

import os
import random
import threading

import pytest
import torch

from coeserve.config import EngineConfig, StoreConfig, parse_bytes
from coeserve.engine.engine import Engine
from coeserve.engine.kv_cache import KVCache
from coeserve.engine.load import load_expert
from coeserve.engine.runner import Runner
from coeserve.engine.sequence import SamplingParams
from coeserve.formats import synthetic
from coeserve.formats.image import ImageError
from coeserve.store.disk import DiskStore
from coeserve.store.store import ExpertStore, StoreFull

from .conftest import GEMMA, SMOL

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = [1, 5, 9, 2]


def tiny_store(tmp_path, n: int, shape: str = "tiny", **over) -> DiskStore:
    disk = DiskStore(tmp_path / "home")
    cfg = synthetic.synthetic_config(shape, **over)
    for i in range(n):
        synthetic.install(disk, f"x{i:03d}", cfg, seed=1000 + i)
    return disk


def run(expert, prompt=PROMPT) -> list[int]:
    eng = Engine(expert, EngineConfig(max_batch=2, max_seq_len=64))
    return eng.generate([prompt], GREEDY)[0].output_ids


def prefill_logits(expert, ids: list[int], max_len: int = 64) -> torch.Tensor:
    kv = KVCache(expert.cfg, 1, max_len, expert.dtype, expert.device)
    runner = Runner(expert.model, kv, expert.device)
    from coeserve.engine.sequence import Sequence
    seq = Sequence(ids, GREEDY)
    seq.slot = kv.allocate()
    return runner.prefill(seq, max_len)


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("200M") == 200 * 10**6
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="invalid size"):
        parse_bytes("12 parsecs")


def test_switching_is_bitwise_exact(store, tmp_path, smol, gemma):
    """Real experts of two architectures and sizes share two slots with a synthetic one; after every
    switch an expert computes exactly what a freshly loaded copy computes."""
    disk = DiskStore(tmp_path / "home")
    disk.root.mkdir(parents=True)
    for name in (SMOL, GEMMA):
        (disk.root / name).symlink_to(store.path(name))
    synthetic.install(disk, "synth", synthetic.synthetic_config("tiny"), seed=7)
    ids = smol.codec.encode("The capital of France is")
    want = {SMOL: prefill_logits(smol, ids), GEMMA: prefill_logits(gemma, ids)}
    st = ExpertStore(disk, StoreConfig(device_slots=2), device="cpu", max_len=64, check=True)
    try:
        for name in [SMOL, GEMMA, "synth", SMOL, "synth", GEMMA, GEMMA, SMOL]:
            with st.use(name) as ex:
                if name in want:
                    got = prefill_logits(ex, ids)
                    assert torch.equal(got, want[name]), name
                    assert ex.model.w["embed.weight"].data_ptr() >= st.dev.buf.data_ptr()  # a view into a slot
                else:
                    run(ex)
        assert st.stats["switches"] >= 6
    finally:
        st.close()


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_150_experts_1000_requests(tmp_path, policy):
    """150 distinct experts, host room for 40, 3 slots: requests in random order from 4 threads each
    get their own expert's output; budgets hold after every operation (check=True audits each)."""
    disk = tiny_store(tmp_path, 150)
    names = disk.names()
    want = {n: run(load_expert(disk, n, device="cpu", max_len=64)) for n in names}
    assert len({tuple(v) for v in want.values()}) == 150  # distinct outputs: a mix-up would show
    size = disk.info(names[0]).bytes
    st = ExpertStore(disk, StoreConfig(host_bytes=40 * size, device_slots=3, policy=policy),
                     device="cpu", max_len=64, check=True)
    rng = random.Random(policy)
    order = [rng.choice(names) for _ in range(1000)]
    errors: list[str] = []

    def worker(part):
        try:
            for n in part:
                with st.use(n) as ex:
                    got = run(ex)
                if got != want[n]:
                    errors.append(f"{n}: {got} != {want[n]}")
                st.check()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(order[i::4],)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert st.host.used <= 40 * size and len(st.resident("device")) <= 3
        assert st.stats["switches"] > 500 and st.stats["host_evictions"] > 100
    finally:
        st.close()


def test_broken_images_fail_alone(tmp_path):
    disk = tiny_store(tmp_path, 4)
    good = run(load_expert(disk, "x000", device="cpu", max_len=64))
    st = ExpertStore(disk, StoreConfig(device_slots=2), device="cpu", max_len=64, check=True)
    try:
        img = disk.path("x001") / "image.bin"
        with open(img, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 64)
        (disk.path("x002") / "image.bin").unlink()
        with pytest.raises(ImageError, match=r"x001.*checksum mismatch"):
            with st.use("x001") as ex:
                run(ex)
        with pytest.raises(ImageError, match=r"x002.*image.bin: missing"):
            with st.use("x002") as ex:
                run(ex)
        for _ in range(3):
            with st.use("x000") as ex:
                assert run(ex) == good
            with st.use("x003") as ex:
                run(ex)
        st.check()
        cfg = disk.config("x001")
        synthetic.install(disk, "x001", cfg, seed=1001)  # re-imported: the next use succeeds
        with st.use("x001") as ex:
            assert run(ex) == run(load_expert(disk, "x001", device="cpu", max_len=64))
    finally:
        st.close()


def test_verbs_pin_evict_prefetch(tmp_path):
    disk = tiny_store(tmp_path, 4)
    st = ExpertStore(disk, StoreConfig(device_slots=2), device="cpu", max_len=64, check=True)
    try:
        assert st.prefetch("x000") and st.prefetch("x001")
        st.load("x000").wait()
        st.load("x001").wait()
        assert sorted(st.resident()) == ["x000", "x001"]
        st.pin("x000")
        st.pin("x001")
        assert not st.can_load("x002") and st.can_load("x002", "host")
        assert st.prefetch("x002")  # no empty slot: returns at once, loading into the host tier only
        assert "x002" not in st.resident() and "x002" in st.resident("host")
        with pytest.raises(StoreFull, match="pinned"):
            st.evict("x000")
        st.unpin("x001")
        assert st.can_load("x002")
        st.load("x002").wait()
        assert sorted(st.resident()) == ["x000", "x002"]  # x001 was the only unpinned one
        st.unpin("x000")
        st.evict("x000")
        st.evict("x000", "host")
        assert st.resident() == ["x002"] and "x000" not in st.resident("host")
        with pytest.raises(ValueError, match="unknown tier"):
            st.load("x000", "ssd")
    finally:
        st.close()


def test_too_large_for_a_tier(tmp_path):
    disk = tiny_store(tmp_path, 2)
    size = disk.info("x000").bytes
    st = ExpertStore(disk, StoreConfig(host_bytes=size // 2, slot_bytes=size), device="cpu", check=True)
    try:
        with pytest.raises(StoreFull, match="host arena holds"):
            st.load("x000")
    finally:
        st.close()


@pytest.mark.parametrize("stored, served", [("fp32", "bf16"), ("bf16", "fp32")])
def test_an_expert_stored_in_another_dtype_runs_from_a_cast_image(tmp_path, stored, served):
    """The image is cast once, on disk, so the tiers hold the bytes the model runs on: switches among
    streamed experts give load_expert's tokens (a cast at bind time read the slot while it was still being
    filled), the parameters are views of the slot, the slots are sized for the cast image, and a second
    store reuses the cast."""
    disk = DiskStore(tmp_path / "home")
    cfg = synthetic.synthetic_config("tiny", num_layers=4, hidden_size=128, intermediate_size=256, vocab_size=4096)
    for i in range(3):
        synthetic.install(disk, f"x{i:03d}", cfg, seed=1000 + i, dtype=stored)
    want = {n: run(load_expert(disk, n, device="cpu", dtype=served, max_len=64)) for n in disk.names()}
    cast, made = disk.path("x000") / "cast" / served / "image.bin", []
    for _ in range(2):
        st = ExpertStore(disk, StoreConfig(device_slots=1, chunk_bytes=4096, read_block=4096, loaders=1),
                         device="cpu", dtype=served, max_len=64, check=True)
        try:
            assert st.budgets.slot_bytes == disk.image_bytes("x000", served)
            for n in ["x000", "x001", "x002", "x000", "x002"]:
                with st.use(n) as ex:
                    assert run(ex) == want[n], n
                    slot = st._entries[n].slot.buf
                    lo, hi = slot.data_ptr(), slot.data_ptr() + slot.numel()
                    assert all(lo <= t.data_ptr() < hi and t.dtype == ex.dtype for t in ex.model.w.values())
        finally:
            st.close()
        assert cast.stat().st_size == disk.image_bytes("x000", served)  # as predicted before the cast
        made.append(cast.stat().st_mtime_ns)
    assert made[0] == made[1] and disk.info("x000").dtype == stored


def test_a_cast_that_cannot_be_written_is_a_clear_error(tmp_path):
    disk = tiny_store(tmp_path, 2)
    (disk.path("x000") / "cast").write_text("")  # where the cast's directory would go
    st = ExpertStore(disk, StoreConfig(device_slots=1), device="cpu", dtype="bf16", max_len=64, check=True)
    try:
        with pytest.raises(ImageError, match=r"x000/cast/bf16: cannot write expert 'x000' cast to bf16 .*"
                                             r"run it in fp32 \(--dtype fp32\) or re-import it with --dtype bf16"):
            st.load("x000")
        with st.use("x001") as ex:  # the others still run
            assert ex.dtype == torch.bfloat16 and len(run(ex)) == GREEDY.max_tokens
    finally:
        st.close()


def test_a_reimport_between_index_and_read_loads_the_new_expert(tmp_path):
    """A re-import swaps the expert's directory after the store read its index and before it opens the
    image (the re-import runs at that moment, from inside the store): the store notices that image.bin
    is another file and reads the new expert whole, instead of failing a sound expert on a checksum."""
    disk = tiny_store(tmp_path, 1)
    cfg = disk.config("x000")
    other = DiskStore(tmp_path / "other")
    synthetic.install(other, "x000", cfg, seed=99)
    want = run(load_expert(other, "x000", device="cpu", max_len=64))
    assert want != run(load_expert(disk, "x000", device="cpu", max_len=64))

    class Racing(ExpertStore):
        raced = False

        def _image(self, name):
            got = super()._image(name)
            if not self.raced:
                self.raced = True
                synthetic.install(self.disk, name, cfg, seed=99)
            return got
    st = Racing(disk, StoreConfig(device_slots=1), device="cpu", max_len=64, check=True)
    try:
        with st.use("x000") as ex:
            assert st.raced and run(ex) == want
    finally:
        st.close()


def test_layer_streaming_starts_before_the_copy_ends(tmp_path):
    """A cold 4-layer expert read in small blocks: the forward pass runs its first part while later
    layers are still arriving, and the result is exact."""
    disk = tiny_store(tmp_path, 1, num_layers=4, hidden_size=256, intermediate_size=1024, vocab_size=8192)
    want = run(load_expert(disk, "x000", device="cpu", max_len=64))
    st = ExpertStore(disk, StoreConfig(device_slots=1, chunk_bytes=4096, read_block=4096, loaders=1),
                     device="cpu", max_len=64, check=True)
    seen: list[int] = []
    try:
        with st.use("x000") as ex:
            t = st.load("x000")
            hook = ex.model.layer_ready
            assert hook is not None

            def spy(i):
                seen.append(t.passed)
                hook(i)
            ex.model.layer_ready = spy
            assert run(ex) == want
        assert seen[0] < len(t.bounds) - 1, "the first layer ran only after the whole copy"
    finally:
        st.close()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_steady_across_2000_switches(tmp_path):
    disk = tiny_store(tmp_path, 5)
    st = ExpertStore(disk, StoreConfig(device_slots=2), device="cpu", max_len=64)
    names = disk.names()
    ids = torch.tensor([PROMPT])
    pos = torch.arange(len(PROMPT))[None]

    def switch(k):
        with st.use(names[k % len(names)]) as ex:
            kv = kvs.setdefault(ex.cfg, KVCache(ex.cfg, 1, 64, ex.dtype, ex.device))
            kv.set_step([0], len(PROMPT))
            ex.model(ids, pos, torch.tensor([0]), kv)

    kvs: dict = {}
    try:
        for k in range(300):
            switch(k)
        before, s0 = rss(), st.stats["switches"]
        for k in range(2000):
            switch(k)
        grew = rss() - before
        assert st.stats["switches"] - s0 == 2000
        assert grew < 8 << 20, f"resident memory grew {grew / 2**20:.1f} MiB over 2000 switches"
    finally:
        st.close()


@pytest.mark.parametrize("where", ["tmpfs", "unaligned"])
def test_disk_read_falls_back_to_buffered_reads(tmp_path, where):
    """O_DIRECT where it works; the page cache where the filesystem refuses it (tmpfs on older kernels)
    or the target is not page-aligned. Either way the bytes arrive whole and checked."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from coeserve.formats.image import load_image, read_index
    from coeserve.store.host import DiskRead

    disk = tiny_store(tmp_path, 1)
    src = disk.path("x000")
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        d = Path(shutil.copytree(src, Path("/dev/shm") / f"coe-test-{tmp_path.name}"))
        out = torch.empty(read_index(d).total_bytes + 8192, dtype=torch.uint8)
        out = out[(-out.data_ptr()) % 4096:]  # aligned: only the filesystem says no
    else:
        d = src
        out = torch.empty(read_index(d).total_bytes + 4096, dtype=torch.uint8)
        out = out[1 + (-out.data_ptr()) % 4096:]
    try:
        index = read_index(d)
        with ThreadPoolExecutor(2) as pool:
            r = DiskRead(d, index, out[:index.total_bytes], pool, block=4096, direct=True)
        assert r.ready and r.error is None
        assert not r.direct or where == "tmpfs"  # newer kernels take O_DIRECT on tmpfs too
        assert torch.equal(out[:index.total_bytes], load_image(d)[1])
    finally:
        if where == "tmpfs":
            shutil.rmtree(d)


def test_direct_reads_on_this_filesystem(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from coeserve.formats.image import load_image, read_index
    from coeserve.store.host import HostArena, DiskRead

    disk = tiny_store(tmp_path, 1)
    index = read_index(disk.path("x000"))
    arena = HostArena(index.total_bytes)
    with ThreadPoolExecutor(2) as pool:
        r = DiskRead(disk.path("x000"), index, arena.view(0, index.total_bytes), pool, block=8192)
    assert r.ready and torch.equal(arena.view(0, index.total_bytes), load_image(disk.path("x000"))[1])
    try:  # the read went O_DIRECT exactly when this filesystem takes it
        os.close(os.open(disk.path("x000") / "image.bin", os.O_RDONLY | os.O_DIRECT))
        assert r.direct
    except OSError:
        assert not r.direct
