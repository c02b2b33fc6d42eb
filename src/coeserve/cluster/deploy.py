"""`coe serve --ray`: coeserve as a Ray Serve application — an ingress deployment (the OpenAI API and
the router) in front of N CoE-node replicas, each with its own tiers and engine loop. Starts a local
Ray cluster, or joins one with `--ray-address`. See docs/cluster.md."""
from __future__ import annotations

import signal
import threading
from dataclasses import asdict, dataclass

from coeserve.server.serve import ServeConfig


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 2
    node_cpus: float = 1.0  # Ray resources per CoE node replica
    node_gpus: float = 0.0
    node_threads: int | None = None  # torch threads per replica (replicas sharing one machine's CPU)
    address: str | None = None  # join this Ray cluster; None = start a local one

    def __post_init__(self):
        if self.replicas < 1 or self.node_cpus < 0 or self.node_gpus < 0:
            raise ValueError("cluster config: replicas ≥ 1, node_cpus and node_gpus ≥ 0")


def application(cfg: ServeConfig, cluster: ClusterConfig):
    from ray import serve

    from coeserve.cluster.node import CoENode

    settings = asdict(cfg)
    env = {"COE_NODE_THREADS": str(cluster.node_threads)} if cluster.node_threads else {}
    node = serve.deployment(CoENode, name="CoENode", num_replicas=cluster.replicas, max_ongoing_requests=1000,
                            ray_actor_options={"num_cpus": cluster.node_cpus, "num_gpus": cluster.node_gpus,
                                               "runtime_env": {"env_vars": env}})
    return _ingress_class().options(name="Ingress", num_replicas=1, max_ongoing_requests=1000,
                                    ray_actor_options={"num_cpus": 0}).bind(node.bind(settings), settings)


def _ingress_class():
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class Ingress:
        """The HTTP app of server/app.py, its scheduler replaced by the remote one."""

        async def __init__(self, node, settings: dict):
            self.node, self.cfg = node, ServeConfig(**settings)

        def __serve_build_asgi_app__(self):
            from coeserve.cluster.remote import RemoteScheduler
            from coeserve.server.app import create_app
            from coeserve.server.metrics import Metrics
            from coeserve.server.serve import build_router, open_experts
            from coeserve.server.state import ServerState

            cfg = self.cfg
            disk, experts = open_experts(cfg)
            router, fallback = build_router(cfg, experts)
            remote = RemoteScheduler(self.node, cfg.max_queue)
            state = ServerState(disk=disk, scheduler=remote, router=router, experts=experts, fallback=fallback,
                                max_seq_len=cfg.max_seq_len, default_max_tokens=cfg.max_tokens,
                                api_key=cfg.api_key, max_body=cfg.max_body, metrics=Metrics(scheduler=remote),
                                ready=True)
            return create_app(state)
    return Ingress


def run(cfg: ServeConfig, cluster: ClusterConfig) -> int:
    import ray
    from ray import serve

    ray.init(address=cluster.address, namespace="coeserve", include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg, cluster), name="coeserve", route_prefix="/")
    print(f"coeserve: Ray Serve app with {cluster.replicas} CoE node replicas at http://{cfg.host}:{cfg.port}/v1",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    if cluster.address is None:
        ray.shutdown()
    return 0
