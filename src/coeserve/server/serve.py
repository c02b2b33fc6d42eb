"""`coe serve`: settings from `--config coe.toml` with flags on top, then uvicorn on the app at once
(answering 503 while starting) while a thread installs missing built-ins and builds the store, router
and scheduler. SIGTERM drains: no new requests (503), in-flight ones finish, then the process exits."""
from __future__ import annotations

import sys
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from coeserve.config import COMPUTE_DTYPES, EngineConfig, StoreConfig, default_home, parse_bytes


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the API has no key by default
    port: int = 8000
    api_key: str | None = None
    home: str | None = None
    experts: tuple[str, ...] = ()  # default: every installed expert (the built-ins are installed first)
    router: str | None = None  # router artifact directory; default: the built-in router
    host_memory: str | None = None
    device_slots: int | None = None
    policy: str = "lru"  # store eviction
    schedule: str = "coe"  # coe | fcfs
    max_batch: int = 8
    max_seq_len: int = 2048
    max_queue: int = 256
    max_wait: float = 5.0
    max_tokens: int = 256  # when a request gives none
    max_body: int = 1 << 20
    device: str = "auto"
    dtype: str = "auto"  # compute dtype: fp32 on CPU, bf16 on CUDA; an image in another dtype is cast once
    fused: bool = False  # decode steps through torch.compile (and CUDA graphs on CUDA)
    prefix_cache: bool = True  # a prompt reuses a free KV slot holding its first tokens (engine/kv_cache.py)
    decode_ahead: int | None = None  # decode passes per engine step (None: 8 on CUDA, 1 on CPU)
    speculate: int = 0  # draft tokens by prompt lookup per step for greedy answers (engine/speculate.py)

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r} ({', '.join(COMPUTE_DTYPES)})")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid port {self.port}")
        if self.schedule not in ("coe", "fcfs"):
            raise ValueError(f"unknown schedule {self.schedule!r} (coe or fcfs)")
        if self.decode_ahead is not None and self.decode_ahead < 1:
            raise ValueError(f"decode_ahead must be at least 1, not {self.decode_ahead}")
        if self.speculate < 0:
            raise ValueError(f"speculate must be 0 (off) or more, not {self.speculate}")
        object.__setattr__(self, "experts", tuple(self.experts))


def load_config(path: str | None, overrides: dict) -> ServeConfig:
    values: dict = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        sections = [v for k, v in data.items() if k != "cluster"] if all(
            isinstance(v, dict) for v in data.values()) else [data]
        for section in sections:
            values.update({k.replace("-", "_"): v for k, v in section.items()})
        known = {f.name for f in fields(ServeConfig)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig(**values)


def open_experts(cfg: ServeConfig):
    """The disk store and the experts to serve (installing the built-ins when none are named)."""
    from coeserve import catalog
    from coeserve.store.disk import DiskStore

    disk = DiskStore(Path(cfg.home) if cfg.home else default_home())
    if not cfg.experts:
        catalog.ensure(disk)
    experts = list(cfg.experts) or disk.names()
    for n in experts:
        disk.info(n)  # a clear error for a name that is not installed
    return disk, experts


def build_node(cfg: ServeConfig, disk, metrics=None, experts: list[str] = ()):
    """The three tiers and the engine loop of one device (with KV memory for `experts` made ready)."""
    from coeserve.formats.image import dtype_name
    from coeserve.scheduler import Scheduler
    from coeserve.store.store import ExpertStore

    store_cfg = StoreConfig(host_bytes=parse_bytes(cfg.host_memory) if cfg.host_memory else None,
                            device_slots=cfg.device_slots, policy=cfg.policy)
    store = ExpertStore(disk, store_cfg, device=cfg.device, dtype=cfg.dtype, max_len=cfg.max_seq_len)
    for name in experts:  # an expert stored in another dtype is cast once, now rather than on a request
        disk.image_dir(name, dtype_name(store.dtype),
                       on_cast=lambda n, d: print(f"coeserve: casting {n} to {d} (once; kept on disk)", flush=True))
    engine_cfg = EngineConfig(max_batch=cfg.max_batch, max_seq_len=cfg.max_seq_len, device=cfg.device,
                              dtype=cfg.dtype, fused=cfg.fused, prefix_cache=cfg.prefix_cache,
                              decode_ahead=cfg.decode_ahead, speculate=cfg.speculate)
    sched = Scheduler(store, engine_cfg, cfg.schedule, cfg.max_queue, cfg.max_wait, metrics=metrics)
    sched.reserve_kv(list(experts))
    if cfg.fused:
        print("coeserve: compiling the decode step (--fused), once per model config", flush=True)
        sched.warm_up(list(experts))
    return store, sched


def build_router(cfg: ServeConfig, experts: list[str]):
    """The router and the general expert that unsure routes fall back to."""
    from coeserve.router.router import Router

    router = Router.load(Path(cfg.router)) if cfg.router else Router.load()
    general = router.spec.mapping.get(router.spec.fallback)
    return router, (general if general in experts else experts[0])


def build(cfg: ServeConfig, state) -> None:
    """Everything slow, on a thread while the port already answers 503."""
    disk, experts = open_experts(cfg)
    store, sched = build_node(cfg, disk, state.metrics, experts)
    state.router, state.fallback = build_router(cfg, experts)
    state.disk, state.store, state.scheduler, state.experts = disk, store, sched, experts
    warm_codecs(state)
    state.metrics.store, state.metrics.scheduler = store, sched
    sched.start()
    state.ready = True


def warm_codecs(state) -> None:
    """Every expert's config and tokenizer before the server is ready: building one (seconds for a large
    vocabulary) on a request would hold the GIL against the engine loop while that request and others wait."""
    from coeserve.engine.load import load_codec

    for name in state.experts:
        codec = load_codec(state.disk, name, state.config(name))
        if codec is not None:
            state.codecs[name] = codec


def run(cfg: ServeConfig) -> int:
    import uvicorn

    from coeserve.server.app import create_app
    from coeserve.server.metrics import Metrics
    from coeserve.server.state import ServerState

    state = ServerState(max_seq_len=cfg.max_seq_len, default_max_tokens=cfg.max_tokens, api_key=cfg.api_key,
                        max_body=cfg.max_body, metrics=Metrics())
    failure: list[BaseException] = []
    server = _server(uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                                    timeout_graceful_shutdown=60), state)

    def start():
        try:
            build(cfg, state)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, which then exits
            failure.append(e)
            server.should_exit = True
            return
        base = f"http://{cfg.host}:{cfg.port}/v1"
        print(f"coeserve: serving {', '.join(state.experts)} and the routed model 'coe' at {base}\n"
              f"  curl {base}/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"coe\", \"messages\": [{{\"role\": \"user\", \"content\": \"Write a Python function that reverses a string.\"}}]}}'\n"
              f"  or: OpenAI(base_url=\"{base}\", api_key=\"{cfg.api_key or 'none'}\")", flush=True)

    threading.Thread(target=start, name="coe-start", daemon=True).start()
    print(f"coeserve: starting on http://{cfg.host}:{cfg.port} (503 until ready)", flush=True)
    server.run()
    if state.scheduler is not None:
        state.scheduler.stop()
        state.store.close()
    if failure:
        raise failure[0]
    return 0


def _server(config, state):
    """A uvicorn.Server that marks the state draining the moment a shutdown signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True
            print("coeserve: draining (finishing in-flight requests)", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has shut down; after a drain we clean up
            # and exit with status 0 instead.
            getattr(self, "_captured_signals", []).clear()
    return Server(config)


def load_cluster(path: str | None, overrides: dict):
    """The `[cluster]` section of the TOML file, flags on top (`coe serve --ray`)."""
    from coeserve.cluster.deploy import ClusterConfig

    values = dict(tomllib.loads(Path(path).read_text()).get("cluster", {})) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ClusterConfig(**{k.replace("-", "_"): v for k, v in values.items()})
