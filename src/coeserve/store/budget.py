"""Tier budgets: what the config says, else sized from the machine at start — slots for the largest
installed expert (in the compute dtype), as many as fit in 80% of free accelerator memory (two on a CPU-only machine, where
the device tier is RAM too), and a host arena of half the available RAM, no larger than every image."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from coeserve.config import StoreConfig
from coeserve.store.disk import DiskStore


@dataclass(frozen=True)
class Budgets:
    host_bytes: int
    device_slots: int
    slot_bytes: int


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_budgets(config: StoreConfig, disk: DiskStore, device: torch.device, dtype: str) -> Budgets:
    sizes = [disk.image_bytes(n, dtype) for n in disk.names()]
    slot = config.slot_bytes or max(sizes, default=0)
    if not slot:
        raise ValueError(f"no experts installed in {disk.root} to size the device slots by (see `coe pull`)")
    slots = config.device_slots
    if slots is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            slots = max(1, int(free * 0.8) // slot)
        else:
            slots = max(1, min(2, available_ram() // 4 // slot))
    host = config.host_bytes
    if host is None:
        host = max(slot, min(sum(sizes), available_ram() // 2 - slots * slot * (device.type == "cpu")))
    return Budgets(host, slots, slot)
