"""A CoE node as a Ray Serve replica: its own three tiers and engine loop (server/serve.py's
`build_node`), serving token ids in and events out. The expert a request needs is its Ray Serve
multiplexed model id, so Serve sends repeat requests for an expert to the replica that holds it."""
from __future__ import annotations

import asyncio
import os
from dataclasses import asdict

from ray import serve

from coeserve.engine.sequence import SamplingParams, Sequence
from coeserve.scheduler import Request


class CoENode:
    def __init__(self, settings: dict):
        from coeserve.server.serve import ServeConfig, build_node, open_experts

        cfg = ServeConfig(**settings)
        if cfg.device in ("auto", "cpu") and os.environ.get("COE_NODE_THREADS"):
            import torch
            torch.set_num_threads(int(os.environ["COE_NODE_THREADS"]))  # replicas sharing one CPU
        self.disk, self.experts = open_experts(cfg)
        self.store, self.scheduler = build_node(cfg, self.disk, experts=self.experts)
        self.scheduler.start()
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.to_full_id_str() if ctx else f"local-{os.getpid()}"

    @serve.multiplexed(max_num_models_per_replica=8)
    async def _expert(self, name: str) -> str:
        """Serve's hook for "load model": start bringing the expert into this replica's tiers."""
        if name not in self.experts:
            raise ValueError(f"expert {name!r} is not served by this node")
        self.store.prefetch(name)
        return name

    async def generate(self, payload: dict):
        """Events: {"kind": "replica"}, then "text" deltas, then "done" (or "error")."""
        name = await self._expert(serve.get_multiplexed_model_id())
        yield {"kind": "replica", "replica": self.replica, "pid": os.getpid()}
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, value):
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        seq = Sequence(list(payload["prompt_ids"]), SamplingParams(**payload["params"]))
        if seq.params.grammar is not None:  # compiled here, in a thread, not on the engine loop at its first step
            await asyncio.to_thread(self._compile, name, seq.params.grammar)
        seq.on_text = lambda t: on_event("text", (t, seq.take_logprobs()))
        job = Request(name, seq, on_event)
        self.scheduler.submit(job)
        finished = False
        try:
            held, first = None, True  # held: an event taken off the queue while joining text deltas
            while True:
                kind, value = held or await events.get()
                held = None
                if kind == "text":
                    # Deltas that queued up while the last item was in flight go as one item: each stream
                    # item costs the node and the ingress a Ray message, whatever its size.
                    text, logprobs = [value[0]], list(value[1])
                    while not events.empty():
                        held = events.get_nowait()
                        if held[0] != "text":
                            break
                        text.append(held[1][0])
                        logprobs += held[1][1]
                        held = None
                    # A prompt's logprobs are all in by its first text: they go with it.
                    yield {"kind": "text", "text": "".join(text), "logprobs": logprobs,
                           "prompt_logprobs": list(seq.prompt_logprobs) if first else []}
                    first = False
                    continue
                finished = True
                if kind == "error":
                    yield {"kind": "error", "message": f"{type(value).__name__}: {value}"}
                else:
                    yield {"kind": "done", "text": value.text, "finish_reason": value.finish_reason,
                           "output_ids": list(value.output_ids), "logprobs": list(value.logprobs),
                           "prompt_logprobs": list(value.prompt_logprobs),
                           "cached": value.cached}
                return
        finally:
            if not finished:
                self.scheduler.cancel(job)

    def _compile(self, name: str, spec: tuple[str, str]) -> None:
        """Compile a structured output's grammar into the cache the engine's matcher reads (per tokenizer).
        The ingress compiled it already with its own copy of the tokenizer, so it compiles; if not, the
        engine ends that sequence with the error."""
        from coeserve.engine import grammar

        codec = self.store.codec(name)
        if codec is not None:
            try:
                grammar.compiled(codec, *spec, self.disk.config(name).vocab_size)
            except grammar.GrammarError:
                pass

    def state(self) -> dict:
        return {"replica": self.replica, "pid": os.getpid(), "device": self.store.resident("device"),
                "host": self.store.resident("host"), "pending": self.scheduler.pending}


def params_dict(params: SamplingParams) -> dict:
    d = asdict(params)
    d["stop"] = list(d["stop"])
    return d
