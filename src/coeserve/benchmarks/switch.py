"""`coe bench switch` (bench/switch.py): moving one expert's bytes between tiers, ours against the raw
limits and the usual loaders, in one run on the same bytes. "Cold" means the file was dropped from the
page cache with posix_fadvise(DONTNEED) just before.

  (a) raw copy limit: one memcpy of the image (CUDA: one pinned host → device copy)
  (b) our host → device switch          (c) our cold disk → device load
  (d) transformers from_pretrained, cold (e) safetensors load_file + .to(device), cold
      (on CPU both return file mappings read on first touch: every page is touched before the clock stops)
  (f) time to first token of a request arriving as its switch starts: layer-streamed vs copy-then-run
      (and the same from a cold file: disk → host → device)
  (g) raw cold sequential read of the image file (the disk limit; the faster of buffered and O_DIRECT)
Prints a table, then one JSON line."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from coeserve.benchmarks.common import device_name, drop_cache, sync, write_result
from coeserve.config import StoreConfig, default_home
from coeserve.engine.kv_cache import KVCache
from coeserve.engine.load import pick_device, pick_dtype
from coeserve.engine.runner import Runner
from coeserve.engine.sampler import sample
from coeserve.engine.sequence import SamplingParams, Sequence
from coeserve.formats import synthetic
from coeserve.formats.image import IMAGE_FILE, dtype_name
from coeserve.store.disk import DiskStore
from coeserve.store.store import ExpertStore


def timed(fn, reps: int, setup=None) -> float:
    """Median seconds of fn() over reps runs, setup() untimed before each."""
    out = []
    for _ in range(reps):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def scratch(st: ExpertStore, nbytes: int) -> torch.Tensor:
    """The second half of the host arena (sized twice the image): raw copies and reads land there."""
    return st.host.view(st.host.capacity - (-(-nbytes // 4096) * 4096), nbytes)


def copy_and_switch(st: ExpertStore, name: str, nbytes: int, reps: int) -> tuple[float, float]:
    """(a) and (b), interleaved so that both see the same machine: a raw copy of the image's size into
    the emptied slot, then our switch of the expert into it. Medians."""
    src, dst = scratch(st, nbytes), st.dev.slots[0].buf[:nbytes]
    src.fill_(1)
    st.load(name).wait()
    raw, ours = [], []
    for _ in range(reps + 1):  # the first round warms both up
        st.evict(name, "device")
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(st.device)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        st.load(name).wait()
        ours.append(time.perf_counter() - t)
    return statistics.median(raw[1:]), statistics.median(ours[1:])


def raw_read(path: Path, out: torch.Tensor, reps: int) -> float:
    """The faster of one buffered reader and one O_DIRECT reader, 16 MiB reads, straight into `out`."""
    mv, n = memoryview(out.numpy()), os.path.getsize(path)

    def read(flags):
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            pos = 0
            while pos < n:
                pos += os.preadv(fd, [mv[pos:min(pos + (16 << 20), n)]], pos)
        finally:
            os.close(fd)
    best = timed(lambda: read(0), reps, lambda: drop_cache(path))
    try:
        best = min(best, timed(lambda: read(os.O_DIRECT), reps, lambda: drop_cache(path)))
    except OSError:
        pass  # no O_DIRECT on this filesystem
    return best


def hf_dir(disk: DiskStore, name: str, dtype: str, out: Path) -> Path | None:
    """The same weights, in the same dtype, as an HF Llama directory (config.json + model.safetensors),
    for (d) and (e)."""
    from safetensors.torch import save_file

    from coeserve.formats.image import load_image, tensor_views
    cfg = disk.config(name)
    if cfg.arch != "llama":
        return None
    index, buf = load_image(disk.image_dir(name, dtype))
    w, t = tensor_views(buf, index), {}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    t["model.embed_tokens.weight"], t["model.norm.weight"] = w["embed.weight"], w["norm.weight"]
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = w["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        qw, kw, vw = w[p + "qkv.weight"].split([q, kv, kv])
        gate, up = w[p + "gate_up.weight"].chunk(2)
        t.update({h + "self_attn.q_proj.weight": qw, h + "self_attn.k_proj.weight": kw,
                  h + "self_attn.v_proj.weight": vw, h + "self_attn.o_proj.weight": w[p + "o.weight"],
                  h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                  h + "mlp.down_proj.weight": w[p + "down.weight"],
                  h + "input_layernorm.weight": w[p + "attn_norm.weight"],
                  h + "post_attention_layernorm.weight": w[p + "mlp_norm.weight"]})
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position,
          "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
          "torch_dtype": str(next(iter(t.values())).dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf))
    return out


def resident(tensors, dev: torch.device) -> None:
    """Make sure the bytes are really there. On CPU both baselines hand back tensors that map the
    file, read only when touched (`.to("cpu")` copies nothing): touch one byte of every page."""
    if dev.type == "cpu":
        for t in tensors:
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    sync(dev)


def load_transformers(d: Path, dev: torch.device, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, device_map=str(dev))
    resident(model.state_dict().values(), dev)
    del model


def load_safetensors(d: Path, dev: torch.device) -> None:
    from safetensors.torch import load_file
    tensors = {k: v.to(dev) for k, v in load_file(str(d / "model.safetensors")).items()}
    resident(tensors.values(), dev)
    del tensors


def first_token(st: ExpertStore, name: str, prompt: list[int], streamed: bool) -> float:
    """Seconds from the start of the switch to the first sampled token."""
    t0 = time.perf_counter()
    if not streamed:
        st.load(name).wait()
    with st.use(name) as ex:
        kv = KVCache(ex.cfg, 1, len(prompt) + 8, ex.dtype, ex.device)
        seq = Sequence(list(prompt), SamplingParams(max_tokens=1, temperature=0.0))
        seq.slot = kv.allocate()
        sample(Runner(ex.model, kv, ex.device).prefill(seq, len(prompt))[None], [seq])
        sync(st.device)
    return time.perf_counter() - t0


def measure(st: ExpertStore, disk: DiskStore, name: str, reps: int, prompt_len: int, tmp: Path,
            loaders: bool = True) -> dict:
    """Every case's median seconds, each printed as it is measured (a run cut short keeps them)."""
    dtype = dtype_name(st.dtype)
    path, nbytes = disk.image_dir(name, dtype) / IMAGE_FILE, disk.image_bytes(name, dtype)
    r = dict(zip(("a_raw_copy_s", "b_switch_s"), copy_and_switch(st, name, nbytes, reps)))
    progress(r, nbytes)

    def cold():
        st.evict(name, "device")
        st.evict(name, "host")
        drop_cache(path)
    # The cold loads take turns, so a disk whose speed drifts (a shared virtual disk does) is seen the
    # same by each.
    hf = hf_dir(disk, name, dtype, tmp / "hf") if loaders else None
    runs = {"c_cold_load_s": lambda: timed(lambda: st.load(name).wait(), 1, cold),
            "g_raw_read_s": lambda: raw_read(path, scratch(st, nbytes), 1)}
    if hf is not None:
        uncache = lambda: drop_cache(hf / "model.safetensors")  # noqa: E731
        runs["d_transformers_s"] = lambda: timed(lambda: load_transformers(hf, st.device, st.dtype), 1, uncache)
        runs["e_safetensors_s"] = lambda: timed(lambda: load_safetensors(hf, st.device), 1, uncache)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, seconds in runs.items():
            times[k].append(seconds())
    r.update({k: statistics.median(v) for k, v in times.items()})
    progress({k: r[k] for k in times}, nbytes)
    prompt = [1 + (i * 7919) % (min(1000, disk.config(name).vocab_size) - 1) for i in range(prompt_len)]
    st.load(name).wait()
    first_token(st, name, prompt, True)  # warm the kernels
    for label, evict in (("", lambda: st.evict(name, "device")), ("cold_", cold)):
        streamed, whole = [], []
        for _ in range(reps if not label else max(1, reps // 2)):
            evict()
            streamed.append(first_token(st, name, prompt, True))
            evict()
            whole.append(first_token(st, name, prompt, False))
        r[f"f_ttft_{label}streamed_s"] = statistics.median(streamed)
        r[f"f_ttft_{label}copy_then_run_s"] = statistics.median(whole)
        progress({k: r[k] for k in (f"f_ttft_{label}streamed_s", f"f_ttft_{label}copy_then_run_s")}, nbytes)
    return r


def progress(values: dict, nbytes: int) -> None:
    for k, v in values.items():
        print(f"  {k:32s} {v * 1e3:10.1f} ms  {nbytes / v / 1e9:7.2f} GB/s", flush=True)


def setup_expert(args, dtype: str, scratch: Path) -> tuple[DiskStore, str]:
    """The expert to move, in the compute dtype (cast once now if it was imported in another)."""
    if args.synthetic_shape:
        disk = DiskStore(scratch / "home")
        name = f"synthetic-{args.synthetic_shape}"
        synthetic.install(disk, name, synthetic.synthetic_config(args.synthetic_shape), dtype=dtype,
                          device=pick_device(args.device))
        return disk, name
    disk = DiskStore(Path(args.home) if args.home else default_home())
    if args.expert == "smollm2-135m-instruct" and not disk.exists(args.expert):
        from coeserve import catalog
        catalog.ensure(disk, [args.expert])
    disk.image_dir(args.expert, dtype)  # a clear error for an expert that is not installed
    return disk, args.expert


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="coe bench switch", description=__doc__.split("\n")[0])
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--synthetic-shape", choices=sorted(synthetic.SHAPES))
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--home")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--skip-loaders", action="store_true",
                    help="leave out (d) and (e), which write and read a second copy (for a short GPU lease)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="coe-bench-switch-", dir=os.environ.get("COE_BENCH_TMP")) as tmp:
        dtype = dtype_name(pick_dtype(args.dtype, pick_device(args.device)))
        disk, name = setup_expert(args, dtype, Path(tmp))
        nbytes = disk.image_bytes(name, dtype)
        cfg = StoreConfig(host_bytes=2 * nbytes, device_slots=1, slot_bytes=nbytes)
        st = ExpertStore(disk, cfg, device=args.device, dtype=dtype, max_len=args.prompt_len + 8)
        try:
            print(f"{name}: {nbytes / 2**20:.0f} MiB on {device_name(st.device)}", flush=True)
            r = measure(st, disk, name, args.reps, args.prompt_len, Path(tmp), loaders=not args.skip_loaders)
        finally:
            st.close()
    result = {"bench": "switch", "expert": name, "bytes": nbytes, "device": device_name(st.device),
              **{k: round(v, 5) for k, v in r.items()}, **ratios(r, nbytes)}
    print_table(result)
    write_result(result, args.out)
    return 0


def ratios(r: dict, nbytes: int) -> dict:
    out = {"host_to_device_GBps": nbytes / r["b_switch_s"] / 1e9, "raw_copy_GBps": nbytes / r["a_raw_copy_s"] / 1e9,
           "disk_GBps": nbytes / r["g_raw_read_s"] / 1e9,
           "ratio_switch_vs_raw_copy": r["b_switch_s"] / r["a_raw_copy_s"],
           "ratio_cold_vs_disk_plus_copy": r["c_cold_load_s"] / (r["g_raw_read_s"] + r["a_raw_copy_s"]),
           "ratio_ttft_streamed_vs_copy_then_run": r["f_ttft_streamed_s"] / r["f_ttft_copy_then_run_s"],
           "ratio_cold_ttft_streamed_vs_copy_then_run": r["f_ttft_cold_streamed_s"] / r["f_ttft_cold_copy_then_run_s"]}
    for k in ("d_transformers_s", "e_safetensors_s"):
        if k in r:
            out[f"ratio_cold_vs_{k[2:-2]}"] = r["c_cold_load_s"] / r[k]
    return {k: round(v, 3) for k, v in out.items()}


TARGETS = {"ratio_switch_vs_raw_copy": 1.10, "ratio_cold_vs_disk_plus_copy": 1.2, "ratio_cold_vs_transformers": 1.0,
           "ratio_cold_vs_safetensors": 1.0, "ratio_ttft_streamed_vs_copy_then_run": 1.0,
           "ratio_cold_ttft_streamed_vs_copy_then_run": 1.0}


def print_table(res: dict) -> None:
    print(f"{res['expert']}: {res['bytes'] / 2**20:.0f} MiB on {res['device']}")
    for k, v in res.items():
        if k.endswith("_s"):
            print(f"  {k:32s} {v * 1e3:10.1f} ms  {res['bytes'] / v / 1e9:7.2f} GB/s")
    for k, target in TARGETS.items():
        if k in res:
            ok = "ok" if (res[k] <= target if target != 1.0 else res[k] < target) else "MISSED"
            print(f"  {k:40s} {res[k]:6.3f}  target {'≤' if target != 1.0 else '<'} {target:.2f}  {ok}")
