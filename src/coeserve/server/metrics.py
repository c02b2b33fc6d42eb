"""Prometheus metrics (prometheus-client), one registry per server: requests, tokens, latencies and
routing measured as they happen; switches, bytes moved, tier occupancy and queue depth read from the
store and the scheduler at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, store=None, scheduler=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("coe_requests", "Requests by expert and status", ["expert", "status"], registry=r)
        self.tokens = Counter("coe_tokens", "Tokens by expert and kind", ["expert", "kind"], registry=r)
        self.ttft = Histogram("coe_time_to_first_token_seconds", "Time to first token", ["expert"],
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("coe_inter_token_latency_seconds", "Time between streamed tokens", ["expert"],
                             buckets=LATENCY, registry=r)
        self.router = Histogram("coe_router_seconds", "Routing time per request", buckets=LATENCY, registry=r)
        self.switches = Counter("coe_switches", "Expert switches by the engine loop", ["expert"], registry=r)
        self.drafts = Counter("coe_draft_tokens", "Draft tokens checked and kept (--speculate)", ["expert", "kind"],
                              registry=r)
        self.batch = Histogram("coe_decode_batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.store, self.scheduler = store, scheduler
        r.register(_Live(self))

    def switch(self, expert: str) -> None:
        self.switches.labels(expert).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values that live in the store and the scheduler, read when scraped."""

    def __init__(self, m: Metrics):
        self.m = m

    def collect(self):
        st, sched = self.m.store, self.m.scheduler
        if st is not None:
            stats = dict(st.stats)
            moved = CounterMetricFamily("coe_bytes_moved", "Bytes moved into a tier", labels=["tier"])
            moved.add_metric(["host"], stats["disk_bytes"])
            moved.add_metric(["device"], st.dev.bytes_copied)
            yield moved
            secs = CounterMetricFamily("coe_switch_seconds", "Seconds spent moving bytes into a tier", labels=["tier"])
            secs.add_metric(["host"], stats["disk_seconds"])
            secs.add_metric(["device"], st.dev.copy_seconds)
            yield secs
            occ = GaugeMetricFamily("coe_tier_bytes", "Bytes held and capacity per tier", labels=["tier", "what"])
            occ.add_metric(["host", "used"], st.host.used)
            occ.add_metric(["host", "capacity"], st.host.capacity)
            occ.add_metric(["device", "used"], len(st.resident()) * st.dev.slot_bytes)
            occ.add_metric(["device", "capacity"], len(st.dev.slots) * st.dev.slot_bytes)
            yield occ
            res = GaugeMetricFamily("coe_expert_resident", "1 when the expert is in the tier", labels=["expert", "tier"])
            for tier in ("host", "device"):
                for name in st.resident(tier):
                    res.add_metric([name, tier], 1)
            yield res
        if sched is not None:
            q = GaugeMetricFamily("coe_queue_depth", "Requests queued or running")
            q.add_metric([], sched.pending)
            yield q
            kv = GaugeMetricFamily("coe_kv_free_slots", "Free KV-cache slots per expert engine", labels=["expert"])
            for name, engine in list(getattr(sched, "engines", {}).items()):
                kv.add_metric([name], len(engine.kv.free))
            yield kv
            where = GaugeMetricFamily("coe_expert_placement", "1 for each replica an expert was served on",
                                      labels=["expert", "replica", "pid"])
            for name, replicas in list(getattr(sched, "placement", {}).items()):
                for r in sorted(replicas):
                    where.add_metric([name, r, str(sched.pids.get(r, ""))], 1)
            yield where
