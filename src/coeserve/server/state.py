"""What the HTTP handlers share: the server's state (stores, scheduler, router, settings, the experts'
configs and tokenizers, loaded once) and ApiError, the error every handler raises for a 4xx or 5xx
(server/app.py turns it into an OpenAI or Ollama error body)."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


@dataclass
class ServerState:
    disk: object = None  # DiskStore: expert configs and tokenizers
    store: object = None  # ExpertStore (None at a cluster's ingress: the nodes hold the tiers)
    scheduler: object = None  # Scheduler, or cluster.remote.RemoteScheduler
    router: object = None
    experts: list[str] = field(default_factory=list)
    fallback: str = ""  # the general expert: low-confidence routes and empty mapping entries go here
    max_seq_len: int = 2048
    default_max_tokens: int = 256
    api_key: str | None = None
    max_body: int = 1 << 20
    metrics: object = None
    ready: bool = False
    draining: bool = False
    codecs: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)
    _post: tuple | None = None  # (event loop, its post function): see post_box

    def codec(self, name: str):
        if name not in self.codecs:
            from coeserve.engine.load import load_codec
            # Shared with the engine loop; concurrent first requests wait for one load (engine/load.py).
            codec = load_codec(self.disk, name, self.config(name))
            if codec is None:
                raise ApiError(400, f"expert {name!r} has no tokenizer; it cannot take text")
            self.codecs[name] = codec
        return self.codecs[name]

    def post_box(self):
        """A thread-safe `post(queue, item)` into the running event loop that wakes the loop once for
        all the items posted before it runs: a decode step's tokens for every stream in the batch
        arrive in one wake-up, not one each (each wake-up takes the GIL from the engine loop)."""
        if self._post is None or self._post[0] is not asyncio.get_running_loop():
            loop, pending, lock = asyncio.get_running_loop(), [], threading.Lock()

            def flush():
                with lock:
                    items = pending[:]
                    pending.clear()
                for q, item in items:
                    q.put_nowait(item)

            def post(q, item):
                with lock:
                    pending.append((q, item))
                    first = len(pending) == 1
                if first:
                    loop.call_soon_threadsafe(flush)
            self._post = (loop, post)
        return self._post[1]

    def context(self, name: str) -> int:
        return min(self.max_seq_len, self.config(name).max_position)

    def vocab(self, name: str) -> int:
        return self.config(name).vocab_size

    def config(self, name: str):
        """An expert's model config, read from disk once (the handlers ask for it on the event loop)."""
        if name not in self.configs:
            self.configs[name] = self.disk.config(name)
        return self.configs[name]
