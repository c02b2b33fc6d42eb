"""Footprint and switch-time planner (`coe plan`): for N experts on given hardware, the machines needed
with every expert in accelerator memory vs with three tiers, the switch time per miss from each tier,
and a throughput/latency bound for a workload. Formulas and preset sources: docs/planner.md.

Presets use peak (datasheet) bandwidths, as the SN40L paper's comparisons do; `--measured` replaces
them with what `coe bench switch` measured on this machine."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GB, TB = 1e9, 1e12
GiB, TiB = 2**30, 2**40


@dataclass(frozen=True)
class Hardware:
    name: str
    units: int  # accelerators (GPUs, RDU sockets) per node
    hbm_bytes: float  # accelerator memory per unit
    hbm_Bps: float  # its bandwidth per unit
    flops: float  # dense bf16 per unit
    host_bytes: float  # host tier per node (DDR)
    host_to_hbm_Bps: float  # one expert's switch bandwidth host → accelerator memory (peak)
    disk_Bps: float  # disk → host per node
    expert_units: int  # units one expert runs across (TP degree); 1 = an expert fits one GPU
    source: str

    def __post_init__(self):
        for f in ("units", "hbm_bytes", "hbm_Bps", "flops", "host_bytes", "host_to_hbm_Bps", "disk_Bps", "expert_units"):
            if getattr(self, f) <= 0:
                raise ValueError(f"hardware {self.name}: {f} must be positive")


PRESETS = {h.name: h for h in (
    Hardware("dgx-h100", 8, 80 * GB, 3.35 * TB, 989e12, 2 * TB, 64 * GB, 30 * GB, 1,
             "NVIDIA DGX H100 datasheet; H100 SXM5 datasheet; PCIe Gen5 x16 = 64 GB/s per direction"),
    Hardware("dgx-a100", 8, 80 * GB, 2.039 * TB, 312e12, 2 * TB, 32 * GB, 25 * GB, 1,
             "NVIDIA DGX A100 datasheet; A100 80GB SXM datasheet; PCIe Gen4 x16 = 32 GB/s per direction"),
    Hardware("sn40l", 8, 64 * GiB, 1.6 * TB, 638e12, 1.5 * TiB * 8, 1 * TB, 30 * GB, 8,
             "SambaNova SN40L paper (arXiv 2405.07518): per socket 520 MiB SRAM, 64 GiB HBM, 1.5 TiB DDR; "
             "DDR→HBM >1 TB/s per node; 638 bf16 TFLOPS per socket"),
    Hardware("h100-pcie-8x", 8, 80 * GB, 2.0 * TB, 756e12, 1 * TB, 64 * GB, 14 * GB, 1,
             "NVIDIA H100 PCIe datasheet (80 GB HBM2e, 2.0 TB/s, 756 TFLOPS bf16); PCIe Gen5 x16"),
    Hardware("gh200", 1, 96 * GB, 4.0 * TB, 989e12, 480 * GB, 450 * GB, 7 * GB, 1,
             "NVIDIA GH200 datasheet: 96 GB HBM3 at 4 TB/s, 480 GB LPDDR5X, NVLink-C2C 900 GB/s (450 each way)"),
)}


@dataclass(frozen=True)
class ExpertGroup:
    count: int
    params: float
    bytes_per_param: float = 2.0  # bf16

    @property
    def bytes(self) -> float:
        return self.params * self.bytes_per_param


_SPEC = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*$")
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_experts(spec: str, home=None) -> list[ExpertGroup]:
    """"150x7B", "10x8B+2x70B", a manifest (.json/.toml: [{count, params, dtype}]) or installed expert
    names ("smollm2-135m-instruct,gemma3-270m")."""
    if Path(spec).suffix in (".json", ".toml") and Path(spec).is_file():
        return _manifest(Path(spec))
    groups = []
    for part in spec.split("+"):
        m = _SPEC.match(part)
        if m:
            groups.append(ExpertGroup(int(m.group(1)), float(m.group(2)) * _SCALE[m.group(3).upper()]))
    if groups and len(groups) == len(spec.split("+")):
        return groups
    if "x" in spec.lower() and re.search(r"\d", spec) and "," not in spec and "-" not in spec:
        raise ValueError(f"invalid experts {spec!r}: use COUNTxSIZE like 150x7B (sizes in K/M/B/T), "
                         "joined by +, a manifest file, or installed expert names")
    return _installed(spec, home)


def _manifest(path: Path) -> list[ExpertGroup]:
    import tomllib
    data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text()).get("experts")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a list of experts ({{count, params, dtype}})")
    per = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int8": 1.0, "int4": 0.5}
    return [ExpertGroup(int(d.get("count", 1)), float(d["params"]), per[d.get("dtype", "bf16")]) for d in data]


def _installed(spec: str, home) -> list[ExpertGroup]:
    from coeserve.config import default_home
    from coeserve.store.disk import DiskStore
    disk = DiskStore(Path(home) if home else default_home())
    out = []
    for name in spec.split(","):
        info = disk.info(name.strip())  # ExpertNotFound names it
        out.append(ExpertGroup(1, info.params, info.bytes / info.params))
    return out


def measured(path: Path, base: Hardware) -> Hardware:
    """This machine, from `coe bench switch --out FILE`: its disk and host → device bandwidths."""
    try:
        r = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (write one with `coe bench switch --out {path}`)") from None
    if r.get("bench") != "switch":
        raise ValueError(f"{path}: not the JSON of `coe bench switch`")
    import torch

    from coeserve.store.budget import available_ram
    ram = _total_ram() or available_ram()
    dev = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else ram / 2  # CPU: the device tier is RAM
    return replace(base, name=f"measured ({r.get('device', 'this machine')})", units=1, expert_units=1,
                   hbm_bytes=dev, host_bytes=ram, hbm_Bps=r["raw_copy_GBps"] * GB,
                   host_to_hbm_Bps=r["host_to_device_GBps"] * GB, disk_Bps=r["disk_GBps"] * GB,
                   source=f"this machine's memory; bandwidths from coe bench switch ({path}); FLOPS of {base.name}")


def _total_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return 0


@dataclass(frozen=True)
class Workload:
    rate: float = 1.0  # requests/s offered
    zipf: float = 1.0
    prompt: int = 512
    output: int = 128
    batch: int = 8


def zipf_hit(k: int, n: int, s: float) -> float:
    """Share of requests whose expert is among the k most popular of n (a static top-k cache)."""
    if k >= n:
        return 1.0
    h = lambda m: sum(1 / (i ** s) for i in range(1, m + 1))  # noqa: E731
    return h(max(k, 0)) / h(n)


def plan(groups: list[ExpertGroup], hw: Hardware, wl: Workload) -> dict:
    n = sum(g.count for g in groups)
    total = sum(g.count * g.bytes for g in groups)
    biggest = max(g.bytes for g in groups)
    mean_params = sum(g.count * g.params for g in groups) / n
    node_hbm = hw.units * hw.hbm_bytes
    hbm_nodes = math.ceil(total / node_hbm)
    tier_nodes = max(math.ceil(total / hw.host_bytes), 1)
    switch = {"hbm": 0.0, "host": biggest / hw.host_to_hbm_Bps, "disk": biggest / hw.disk_Bps + biggest / hw.host_to_hbm_Bps}
    # Decode is bounded by reading the weights once per step (bandwidth) or by the math (compute).
    bw, fl = hw.expert_units * hw.hbm_Bps, hw.expert_units * hw.flops
    step = max(biggest / bw, 2 * mean_params * wl.batch / fl)
    prefill = 2 * mean_params * wl.prompt / fl
    servers = hw.units // hw.expert_units  # experts running at once on a node
    held = int(node_hbm * 0.8 // biggest)  # experts resident in accelerator memory (20% kept for KV)
    hit = zipf_hit(held, n, wl.zipf)
    host_hit = zipf_hit(int(hw.host_bytes // biggest), n, wl.zipf)
    miss_cost = (host_hit - hit) * switch["host"] + (1 - host_hit) * switch["disk"]
    per_req = prefill + wl.output * step / wl.batch + miss_cost / wl.batch  # a switch serves a whole batch
    return {"experts": n, "total_bytes": total, "expert_bytes": biggest, "hardware": hw.name,
            "nodes_all_in_hbm": hbm_nodes, "nodes_three_tier": tier_nodes, "footprint_ratio": hbm_nodes / tier_nodes,
            "switch_s": switch, "hbm_hit_rate": hit, "host_hit_rate": host_hit,
            "decode_step_s": step, "prefill_s": prefill,
            "throughput_bound_rps": servers / per_req, "offered_rps": wl.rate,
            "latency_bound_s": prefill + wl.output * step + miss_cost,
            "workload": asdict(wl)}


def compare(groups, names: list[str], wl: Workload, measured_file=None) -> list[dict]:
    hws = [PRESETS[n] if n in PRESETS else _unknown(n) for n in names]
    if measured_file:
        hws.append(measured(measured_file, hws[0]))
    return [plan(groups, hw, wl) for hw in hws]


def _unknown(name: str):
    raise ValueError(f"unknown hardware {name!r} (choose from {', '.join(PRESETS)})")
