"""The serving benchmarks' workload (bench/serve.py, bench/cluster.py): an expert directory of the built-ins
and synthetic experts, Zipf popularity and Poisson arrivals over them, the streaming client that replays
it against a live server, and what it reads back from the server."""
from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no what out up "
         "about who them some could time into only then its people two more these also now first may").split()


def make_home(tmp: Path, synthetic: int, home: Path, dtype: str = "fp32") -> list[str]:
    """The bench's expert directory: the built-ins (linked from `home` in fp32, imported anew in another
    dtype) and the synthetic experts, all stored in `dtype`."""
    from coeserve import catalog
    from coeserve.formats import synthetic as syn
    from coeserve.store.disk import TOKENIZER_DIR, DiskStore

    real = DiskStore(home)
    catalog.ensure(real)
    disk = DiskStore(tmp / "home")
    disk.root.mkdir(parents=True)
    for name in catalog.BUILTINS:
        if dtype == "fp32":
            (disk.root / name).symlink_to(real.path(name))
        else:
            catalog.pull(disk, name, dtype=dtype)
    tok = real.path("smollm2-135m-instruct") / TOKENIZER_DIR
    cfg = syn.synthetic_config("tiny", vocab_size=49152, hidden_size=512, intermediate_size=1536, num_layers=8,
                               num_heads=8, num_kv_heads=4, head_dim=64)
    for i in range(synthetic):
        disk.add(f"synth-{i}", cfg, syn.random_tensors(cfg, seed=i), dtype, "synthetic", tokenizer_dir=tok)
    return disk.names()


def workload(experts: list[str], n: int, rate: float, zipf: float, seed: int, words: tuple[int, int] = (12, 200),
             tokens: tuple[int, int] = (8, 64)) -> list[dict]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(len(experts))]
    order = experts[:]
    rng.shuffle(order)  # which expert is popular is random, not alphabetical
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        n_words = rng.randint(*words)
        out.append({"at": t, "model": rng.choices(order, weights)[0], "max_tokens": rng.randint(*tokens),
                    "prompt": " ".join(rng.choice(WORDS) for _ in range(n_words))})
    return out


async def one(client, req: dict, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + req["at"] - time.monotonic()))
    start, first = time.monotonic(), None
    stream = await client.completions.create(model=req["model"], prompt=req["prompt"], max_tokens=req["max_tokens"],
                                             temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.monotonic()
    end = time.monotonic()
    return {"ttft": (first or end) - start, "end": end, "start": start}


async def drive(base: str, reqs: list[dict]) -> list[dict]:
    import openai
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    t0 = time.monotonic()
    try:
        return await asyncio.gather(*(one(client, r, t0) for r in reqs))
    finally:
        await client.close()


def wait_ready(base: str, proc, timeout=600) -> None:
    import urllib.request
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def scrape(base: str) -> dict[str, float]:
    """Switches and the mean decode batch, from the server's /metrics."""
    import urllib.request
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()

    def total(prefix):
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(prefix))
    steps = total("coe_decode_batch_size_count")
    return {"switches": total("coe_switches_total"),
            "mean_batch": total("coe_decode_batch_size_sum") / steps if steps else 0.0}
