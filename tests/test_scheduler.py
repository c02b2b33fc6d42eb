"""The scheduler on a real store of tiny random-weight experts: every request gets its own expert's
tokens under both schedules, `coe` batches where `fcfs` switches, the bound on waiting holds against a
flood, and a batch that must end for a waiting expert still takes requests that end within it."""
from __future__ import annotations

import threading
import time

import pytest

from coeserve.config import EngineConfig, StoreConfig
from coeserve.engine.load import load_expert
from coeserve.engine.engine import Engine
from coeserve.engine.sequence import SamplingParams, Sequence
from coeserve.scheduler import Request, Scheduler
from coeserve.store.store import ExpertStore

from .test_store import tiny_store

PROMPT = [1, 5, 9, 2]
CONFIG = EngineConfig(max_batch=4, max_seq_len=128)


class Log:
    """Finished requests in the order they finished."""

    def __init__(self):
        self.done: list[Request] = []
        self.errors: list[Exception] = []
        self.cond = threading.Condition()

    def request(self, expert: str, max_tokens: int) -> Request:
        seq = Sequence(list(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        req = Request(expert, seq, lambda kind, x: self._event(req, kind, x))
        return req

    def _event(self, req: Request, kind: str, payload) -> None:
        with self.cond:
            if kind == "done":
                self.done.append(req)
            elif kind == "error":
                self.errors.append(payload)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 120.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.done) + len(self.errors) >= n, timeout)
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("sched"), 3)


@pytest.fixture(scope="module")
def alone(disk):
    """Each expert's greedy tokens for PROMPT, run on its own engine (longer outputs extend shorter)."""
    out = {}
    for n in disk.names():
        eng = Engine(load_expert(disk, n, device="cpu", max_len=128), CONFIG)
        out[n] = eng.generate([PROMPT], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0].output_ids
    assert len({tuple(v) for v in out.values()}) == 3
    return out


def scheduler(disk, policy: str, max_wait: float = 60.0, slots: int = 1) -> Scheduler:
    st = ExpertStore(disk, StoreConfig(device_slots=slots), device="cpu", max_len=128, check=True)
    return Scheduler(st, CONFIG, policy=policy, max_wait=max_wait)


def stop(s: Scheduler) -> None:
    s.stop()
    s.store.close()


@pytest.mark.parametrize("policy", ["coe", "fcfs"])
def test_every_request_gets_its_own_experts_tokens(disk, alone, policy):
    names, log = disk.names(), Log()
    reqs = [log.request(names[(i * 7) % 3], 4 + (i * 5) % 20) for i in range(24)]
    s = scheduler(disk, policy)
    s.start()
    try:
        for r in reqs:
            s.submit(r)
        log.wait(len(reqs))
    finally:
        stop(s)
    for r in reqs:
        assert r.seq.output_ids == alone[r.expert][: r.seq.params.max_tokens], r.expert
        assert r.seq.finish_reason == "length"
    assert s.pending == 0


def test_fused_serving_shares_one_compiled_step_among_a_slots_experts(disk, alone):
    """`coe serve --fused`: three experts take turns in one slot and every request still gets its
    expert's eager tokens (the first steps after a switch run eager while layers stream in). The experts'
    engines share the slot's compiled step: the warm-up before serving compiles it (batch 1 and the rest
    are all the shapes there are), switching compiles nothing new, and nothing breaks the graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    names, log = disk.names(), Log()
    reqs = [log.request(names[i % 3], 4 + i % 5) for i in range(12)]
    st = ExpertStore(disk, StoreConfig(device_slots=1), device="cpu", max_len=128, check=True)
    s = Scheduler(st, EngineConfig(max_batch=4, max_seq_len=128, fused=True), policy="fcfs")
    assert s.warm_up(names) == 1  # one config among the three
    warm = counters["stats"]["unique_graphs"]
    s.start()
    try:
        for r in reqs:
            s.submit(r)
        log.wait(len(reqs), timeout=600)
    finally:
        stop(s)
    for r in reqs:
        assert r.seq.output_ids == alone[r.expert][: r.seq.params.max_tokens], r.expert
    assert s.switches >= 3 and 1 <= warm == counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]


def test_coe_batches_where_fcfs_switches(disk, alone):
    """Requests alternating between two experts, queued together: FCFS switches at almost every one;
    coe runs each expert's requests as batches."""
    names = disk.names()[:2]
    switches = {}
    for policy in ("fcfs", "coe"):
        log, s = Log(), scheduler(disk, policy)
        reqs = [log.request(names[i % 2], 6) for i in range(16)]
        for r in reqs:  # queued before the loop starts, so both schedules see the same queue
            s.submit(r)
        s.start()
        try:
            log.wait(len(reqs))
        finally:
            stop(s)
        assert all(r.seq.output_ids == alone[r.expert][:6] for r in reqs)
        switches[policy] = s.switches
    assert switches["fcfs"] >= 12 and switches["coe"] <= 5, switches


def behind_a_running_batch(disk, tokens: int, later, max_wait: float = 5.0, batch: int = 2):
    """`batch` requests of `tokens` tokens for the first expert are decoding when the requests
    `later(log)` makes are queued; the first of them (for another expert) arrived 10 s ago."""
    a = disk.names()[0]
    log, s = Log(), scheduler(disk, "coe", max_wait=max_wait)
    running = [log.request(a, tokens) for _ in range(batch)]
    s.start()
    try:
        for r in running:
            s.submit(r)
        deadline = time.monotonic() + 60
        while not all(r.seq.output_ids for r in running) and time.monotonic() < deadline:
            time.sleep(0.001)
        queued = later(log)
        queued[0].arrival -= 10.0
        for r in queued:
            s.submit(r)
        log.wait(2 + len(queued))
    finally:
        stop(s)
    return log, queued


@pytest.mark.parametrize("max_wait", [0.05, 600.0])
def test_the_bound_on_waiting_holds_against_a_flood(disk, alone, max_wait):
    """4 requests for one expert are running when one for another expert, 10 s old, and then a flood of
    20 more for the first arrive. Past max_wait no later request joins the first expert's batch ahead
    of the lone one, so it finishes long before the flood does; with a bound the flood cannot reach,
    the flood overtakes it (so the test can fail)."""
    a, b = disk.names()[:2]
    log, (lone, *flood) = behind_a_running_batch(
        disk, 16, lambda log: [log.request(b, 4)] + [log.request(a, 16) for _ in range(20)], max_wait, batch=4)
    where = log.done.index(lone)
    if max_wait < 1:
        assert where < 12, where
    else:
        assert where == 24, where
    assert lone.seq.output_ids == alone[b][:4]


def test_a_batch_that_must_end_still_takes_requests_that_end_within_it(disk, alone):
    """Two long requests for one expert are running when a request for another expert is already past
    the bound. A short request for the running expert joins the batch (it ends before the batch would)
    and finishes before the waiting one; a long one does not join, and runs after it."""
    a, b = disk.names()[:2]
    log, (lone, short, long) = behind_a_running_batch(
        disk, 100, lambda log: [log.request(b, 4), log.request(a, 8), log.request(a, 110)])
    order = log.done.index
    assert order(short) < order(lone) < order(long), [r.seq.params.max_tokens for r in log.done]
    assert short.seq.output_ids == alone[a][:8] and lone.seq.output_ids == alone[b][:4]


def test_requests_that_end_within_a_batch_join_it_at_most_max_batch_times(disk, alone):
    """A flood of 2-token requests for the running expert while another expert's request is past the
    bound: the batch takes at most max_batch of them before it ends, then the waiting one runs."""
    a, b = disk.names()[:2]
    log, (lone, *flood) = behind_a_running_batch(
        disk, 120, lambda log: [log.request(b, 4)] + [log.request(a, 2) for _ in range(20)])
    before = sum(1 for r in log.done[: log.done.index(lone)] if r in flood)
    assert 1 <= before <= CONFIG.max_batch, before
    assert all(r.seq.output_ids == alone[a][:2] for r in flood)


def test_kv_buffers_are_made_for_the_largest_cache_needed_so_far(tmp_path):
    """A small expert after a large one gets a buffer the large one could use too: when its engine is
    dropped, the next large expert takes that buffer instead of zeroing new memory."""
    from coeserve.formats import synthetic

    disk = tiny_store(tmp_path, 2)  # x000, x001: 2 layers
    synthetic.install(disk, "big", synthetic.synthetic_config("tiny", num_layers=6), seed=7)
    log, s = Log(), scheduler(disk, "coe")
    s.start()
    try:
        for n, name in enumerate(["x000", "big", "x001"]):
            s.submit(log.request(name, 3))
            log.wait(n + 1)
    finally:
        stop(s)
    size = {n: e.kv.buffer.numel() for n, e in s.engines.items()}
    assert size["big"] > size["x000"] and size["x001"] == size["big"], size


def test_a_request_starts_its_experts_load_from_the_loop(disk):
    """Submitting queues the request and returns; the scheduler loop starts the expert's load (into a
    free slot) when it takes the request, so the caller (the server's event loop) does no store work."""
    log, s = Log(), scheduler(disk, "coe", slots=2)
    a, b = disk.names()[:2]
    running = log.request(a, 400)
    s.submit(running)
    assert s.store.resident() == [] and s.store.resident("host") == []  # nothing yet: the loop is not running
    s.start()
    try:
        deadline = time.monotonic() + 60
        while not running.seq.output_ids and time.monotonic() < deadline:
            time.sleep(0.001)
        s.submit(log.request(b, 2))
        while b not in s.store.resident() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert b in s.store.resident() and not running.seq.finished  # loaded while a still decodes
        log.wait(2)
    finally:
        stop(s)


def test_kv_memory_reserved_before_serving_serves_every_expert(tmp_path):
    """`reserve_kv` zeroes slots + 2 buffers up front, each large enough for any expert served; engines
    for small and large experts, made and dropped at switch after switch, only ever use those."""
    from coeserve.formats import synthetic

    disk = tiny_store(tmp_path, 4)
    synthetic.install(disk, "big", synthetic.synthetic_config("tiny", num_layers=6), seed=7)
    log, s = Log(), scheduler(disk, "coe")
    s.reserve_kv(disk.names())
    reserved = {b.data_ptr() for b in s._kv_spare}
    assert len(reserved) == 3  # one device slot + 2
    order = ["x000", "x001", "x002", "big", "x003", "x000", "big", "x001"]
    s.start()
    try:
        for n, name in enumerate(order):
            s.submit(log.request(name, 3))
            log.wait(n + 1)
            assert {e.kv.buffer.data_ptr() for e in s.engines.values()} <= reserved, name
    finally:
        stop(s)
    assert s.switches == len(order)
