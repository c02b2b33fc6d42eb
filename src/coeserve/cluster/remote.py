"""The ingress side of a cluster: the scheduler interface the HTTP app talks to (`submit / cancel /
pending`), forwarding each request to a CoE node replica through a Ray Serve handle with the expert as
the multiplexed model id (affinity: Serve prefers a replica that already holds it, else the least
loaded one, which loads it). A request whose replica dies before it has sent the client anything is
retried on another; `placement` records where each expert was served."""
from __future__ import annotations

import asyncio

from coeserve.cluster.node import params_dict
from coeserve.scheduler import QueueFull


class RemoteScheduler:
    def __init__(self, node_handle, max_queue: int = 256, retries: int = 2):
        self.handle, self.max_queue, self.retries = node_handle, max_queue, retries
        self.placement: dict[str, set[str]] = {}  # expert → replicas it was served on
        self.pids: dict[str, int] = {}  # replica → its process
        self._tasks: dict = {}

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def submit(self, job) -> None:
        """From the event loop: start forwarding `job` to a replica."""
        if len(self._tasks) >= self.max_queue:
            raise QueueFull(f"the server queue is full ({self.max_queue} requests); retry later")
        self._tasks[job] = asyncio.get_running_loop().create_task(self._pump(job))

    def cancel(self, job) -> None:
        task = self._tasks.get(job)
        if task is not None:
            task.cancel()  # Serve cancels the replica's generator, which frees the KV slot there

    async def _pump(self, job) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        payload = {"prompt_ids": list(job.seq.prompt_ids), "params": params_dict(job.seq.params)}
        try:
            for attempt in range(self.retries + 1):
                sent = []
                try:
                    await self._forward(job, payload, sent)
                    return
                except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                    # Text already streamed to the client cannot be taken back; otherwise try again.
                    if (sent and not job.buffered) or attempt == self.retries:
                        job.on_event("error", RuntimeError(f"the node serving {job.expert} failed: {e}"))
                        return
        finally:
            self._tasks.pop(job, None)

    async def _forward(self, job, payload: dict, sent: list) -> None:
        gen = self.handle.options(stream=True, multiplexed_model_id=job.expert).generate.remote(payload)
        async for ev in gen:
            kind = ev["kind"]
            if kind == "replica":
                self.placement.setdefault(job.expert, set()).add(ev["replica"])
                self.pids[ev["replica"]] = ev["pid"]
            elif kind == "text":
                sent.append(ev["text"])
                if ev["prompt_logprobs"]:
                    job.seq.prompt_logprobs = ev["prompt_logprobs"]
                if not job.buffered:
                    job.on_event("text", (ev["text"], ev["logprobs"]))
            elif kind == "error":
                job.on_event("error", RuntimeError(ev["message"]))
                return
            else:
                seq = job.seq
                seq.text, seq.finish_reason, seq.output_ids = ev["text"], ev["finish_reason"], ev["output_ids"]
                seq.logprobs, seq.cached, seq.prompt_logprobs = ev["logprobs"], ev["cached"], ev["prompt_logprobs"]
                job.on_event("done", seq)
                return
