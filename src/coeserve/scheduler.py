"""Expert-aware continuous batching: one loop thread per device, a queue per expert, and a policy that
picks which expert's batch runs next. Requests arrive already routed (the router decided before they
were queued), and their expert is prefetched into a free slot while other work runs.

Policies (names are the CLI's `--schedule` choices):
- `coe`: a running batch finishes before a switch, and new requests for its expert join it as seats
  free — once a request for another expert has waited past `max_wait`, only ones that overtake nobody,
  or (at most max_batch of them a batch) ones sure to end within the batch's life (no more tokens to
  go than its longest member), which delay the switch by no more than their prefills. Between batches the next expert is the one
  with the most queued work (plus its oldest request's age) per second of switch cost — zero for one
  already in a slot — unless a request has waited past `max_wait`: then its expert goes next, whatever
  the cost, so nothing starves. Each turn takes every queued request of its expert, up to max_batch.
- `fcfs`: first come, first served — the oldest request's expert runs; consecutive requests for it
  join its batch (FCFS + LRU, how Samba-CoE's serving is described in later work; the baseline).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from coeserve.config import EngineConfig
from coeserve.engine.engine import Engine
from coeserve.engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)
class Request:
    expert: str
    seq: Sequence
    # ("text", (str, [TokenLogprob])) | ("done", Sequence) | ("error", Exception)
    on_event: Callable[[str, object], None]
    buffered: bool = False  # the client gets the whole answer at the end (not streamed)
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None  # first token time


class Scheduler:
    def __init__(self, store, engine_config: EngineConfig, policy: str = "coe", max_queue: int = 256,
                 max_wait: float = 5.0, metrics=None):
        if policy not in ("coe", "fcfs"):
            raise ValueError(f"unknown schedule {policy!r} (coe or fcfs)")
        self.store, self.config, self.policy = store, engine_config, policy
        self.max_queue, self.max_wait, self.metrics = max_queue, max_wait, metrics
        self.queues: dict[str, deque[Request]] = {}
        self.engines: dict[str, Engine] = {}  # experts with an engine (KV cache); running ones first
        self._kv_spare: list = []  # KV memory of dropped engines, for the next ones (zeroed once)
        self._kv_bytes = 0  # the largest KV cache an engine has needed: every new buffer is this large
        self._tail_joins: dict[str, int] = {}  # expert → requests its running batch took past the bound
        self.active: dict[str, list[Request]] = {}  # expert → requests inside its engine
        self.current: str | None = None  # the expert acquired (pinned) for compute
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.switches = 0
        self._thread = threading.Thread(target=self._loop, name="coe-scheduler", daemon=True)

    # -- from any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def reserve_kv(self, experts: list[str]) -> None:
        """Before serving: zero the KV memory the loop keeps (slots + 2 buffers, or one per expert if
        fewer), each buffer large enough for any of `experts`, so no switch waits on fresh memory."""
        import torch

        for cfg in map(self.store.disk.config, experts):  # the store builds models for store.max_len
            need = Engine.kv_bytes(cfg, self.store.dtype, self.store.max_len or cfg.max_position, self.config)
            self._kv_bytes = max(self._kv_bytes, need)
        for _ in range(min(len(self.store.dev.slots) + 2, len(experts)) - len(self._kv_spare)):
            self._kv_spare.append(torch.zeros(self._kv_bytes, dtype=torch.uint8, device=self.store.device))

    def warm_up(self, experts: list[str]) -> int:
        """Fused mode, before serving: run the compiled decode step once per model config among `experts`
        (the experts of a config share it) for one sequence and for two (the batch then turns symbolic),
        so that no request waits on a compile (minutes on a CPU). Returns how many configs it compiled."""
        if not self.config.fused:
            return 0
        done = []
        for name in experts:
            cfg = self.store.disk.config(name)
            if cfg in done:
                continue
            done.append(cfg)
            expert = self.store.acquire(name)
            try:
                engine = self._engine(name, expert)  # the loop's, kept
                params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
                for n in (1, 2):  # a prefill step (eager) and two decode steps (compiled)
                    engine.generate([[1, 1]] * n, params)
            finally:
                self.store.release(name)
        return len(done)

    def submit(self, req: Request) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} requests); retry later")
            self._pending += 1
        self._inbox.put(("add", req))  # the loop starts its expert's load (a prefetch) when it takes it
        self._wake.set()

    def cancel(self, req: Request) -> None:
        self._inbox.put(("cancel", req))
        self._wake.set()

    @property
    def pending(self) -> int:
        return self._pending

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued and running, then end the loop."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._drain()
            if not any(self.queues.values()) and not any(self.active.values()):
                if self._stop:
                    break
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            name = self._pick()
            try:
                engine = self._switch_to(name)
                self._admit(name, engine)
                self._step(name, engine)
            except Exception as e:  # noqa: BLE001 - one expert's failure (a corrupted image…) is its own
                self._fail_expert(name, e)
        if self.current:
            self.store.release(self.current)
            self.current = None

    def _drain(self) -> None:
        while not self._inbox.empty():
            op, req = self._inbox.get_nowait()
            if op == "add":
                # The routing decision starts the load before the queue moves. The loop does it, not the
                # request's thread: building a model and reading an index there would hold the GIL
                # against the event loop and slow every stream.
                self.store.prefetch(req.expert)
                self.queues.setdefault(req.expert, deque()).append(req)
            elif req in self.queues.get(req.expert, ()):
                self.queues[req.expert].remove(req)
                self._finish(req, "abort")
            elif req in self.active.get(req.expert, ()):
                self.engines[req.expert].abort(req.seq)
                self.active[req.expert].remove(req)
                self._finish(req, "abort")

    def _work(self) -> dict[str, float]:
        """Expert → arrival of its oldest waiting or running request."""
        out = {}
        for name in set(self.queues) | set(self.active):
            reqs = list(self.queues.get(name, ())) + self.active.get(name, [])
            if reqs:
                out[name] = min(r.arrival for r in reqs)
        return out

    def _pick(self) -> str:
        work = self._work()
        oldest = min(work, key=work.get)
        if self.policy == "fcfs":
            return oldest
        if self.active.get(self.current):
            return self.current  # a running batch finishes before a switch (its KV and weights are hot)
        now = time.monotonic()
        if now - work[oldest] > self.max_wait:
            return oldest  # the bound on waiting, whatever the switch costs
        resident = set(self.store.resident())

        def score(n):
            cost = 0.0 if n in resident else self.store.switch_cost(n)
            queued = len(self.queues.get(n, ()))
            return (queued + (now - work[n]) / self.max_wait) / (cost + 0.05)
        return max(work, key=score)

    def _starving(self, name: str) -> bool:
        """Has a request for another expert waited past max_wait?"""
        limit = time.monotonic() - self.max_wait
        return any(q and q[0].arrival < limit for n, q in self.queues.items() if n != name)

    def _switch_to(self, name: str) -> Engine:
        if name == self.current:
            return self.engines[name]
        if self.current is not None:
            self.store.release(self.current)  # first: with one slot, the next expert needs it
            self.current = None
        expert = self.store.acquire(name)
        self.current = name
        self.switches += 1
        if self.metrics:
            self.metrics.switch(name)
        return self._engine(name, expert)

    def _engine(self, name: str, expert) -> Engine:
        """`name`'s engine, kept across switches (made at its first), stepping the acquired `expert`."""
        engine = self.engines.get(name)
        if engine is None:
            return self._new_engine(name, expert)
        engine.bind(expert)
        return engine

    def _new_engine(self, name: str, expert) -> Engine:
        """Keep KV caches for experts with work plus a few more (slots + 2 buffers in all, spares
        included); an idle engine beyond that leaves its buffer to a new one, which spares zeroing it.
        Buffers are made as large as the largest cache needed so far, so a spare fits any expert."""
        keep = len(self.store.dev.slots) + 2
        idle = [n for n in self.engines if n != self.current and not self.active.get(n)]
        for n in idle[: max(0, len(self.engines) + 1 - keep)]:
            self._kv_spare.append(self.engines.pop(n).kv.buffer)
        need = Engine.kv_bytes(expert.cfg, expert.dtype, expert.model.max_len, self.config)
        self._kv_bytes = max(self._kv_bytes, need)
        engine = self.engines[name] = Engine(expert, self.config, self._kv_spare, self._kv_bytes)
        self._kv_spare.sort(key=lambda b: -b.numel())  # the largest are kept
        del self._kv_spare[max(0, keep - len(self.engines)):]
        return engine

    def _admit(self, name: str, engine: Engine) -> None:
        q, active = self.queues.get(name, deque()), self.active.setdefault(name, [])
        if not active:
            self._tail_joins[name] = 0  # a new batch
        limit = float("inf")  # requests that arrived after `limit` may not join now
        heads = [o[0].arrival for n, o in self.queues.items() if n != name and o]
        if self.policy == "fcfs" or (active and self._starving(name)):
            # FCFS: nobody overtakes an earlier request for another expert. coe: a running batch keeps
            # filling only with requests that overtake no one who has waited past max_wait.
            limit = min(heads, default=limit)
        while q and len(active) < self.config.max_batch and q[0].arrival <= limit:
            req = q.popleft()
            engine.add(req.seq)
            active.append(req)
        if self.policy == "coe" and active and q and len(active) < self.config.max_batch:
            self._fill_tail(name, q, active, engine)

    def _fill_tail(self, name: str, q: deque, active: list[Request], engine: Engine) -> None:
        """Seats left in a batch that must end for a waiting expert go to queued requests that are sure
        to finish within the batch's life (at most as many tokens to go as its longest member): the
        switch comes no later, and those tokens cost a fraction of a batch of their own."""
        left = max(r.seq.params.max_tokens - len(r.seq.output_ids) for r in active)
        # Each joiner's prefill still delays the switch a little, so a batch takes at most max_batch
        # this way: the wait past the bound stays within the batch's life plus that many prefills.
        room = min(self.config.max_batch - len(active), self.config.max_batch - self._tail_joins[name])
        for req in [r for r in q if r.seq.params.max_tokens <= left][: max(0, room)]:
            self._tail_joins[name] += 1
            q.remove(req)
            engine.add(req.seq)
            active.append(req)

    def _step(self, name: str, engine: Engine) -> None:
        if self.metrics and engine.running:
            self.metrics.batch.observe(len(engine.running))
        drafts = dict(engine.speculation)
        done = engine.step()
        if self.metrics:
            for kind, n in engine.speculation.items():
                if n > drafts[kind]:
                    self.metrics.drafts.labels(name, kind).inc(n - drafts[kind])
        for req in list(self.active.get(name, ())):
            if req.seq in done or req.seq.finished:
                self.active[name].remove(req)
                self._finish(req, None)

    def _finish(self, req: Request, reason: str | None) -> None:
        with self._lock:
            self._pending -= 1
        if reason:
            req.seq.finish_reason = reason
        if req.seq.error:  # this sequence alone failed (a grammar a node could not compile)
            req.on_event("error", RuntimeError(req.seq.error))
        else:
            req.on_event("done", req.seq)

    def _fail_expert(self, name: str, err: Exception) -> None:
        # Its requests get the error; the log keeps where it came from (a failure inside torch reads
        # as a bare AssertionError to a client).
        log.error("expert %s failed: %r", name, err, exc_info=err)
        for req in list(self.queues.pop(name, ())) + self.active.pop(name, []):
            with self._lock:
                self._pending -= 1
            req.on_event("error", err)
        self.engines.pop(name, None)
        if self.current == name:
            self.store.release(name)
            self.current = None
