"""The KV cache: per layer, one [slots, kv_heads, max_len, head_dim] tensor for keys and one for values,
allocated once. A sequence owns a slot for its life; its token at position p lives at index p. One extra slot
(`scratch`) takes the writes of padding rows when a fused decode runs a batch padded to a fixed size.

The tensors may be carved from a byte buffer an earlier cache no longer needs (`spares=`), so a server
that makes caches for expert after expert zeroes its memory once, not at every switch. Positions a
sequence has not written hold zeros or an earlier sequence's finite values; attention never weighs them."""
from __future__ import annotations

import torch

from coeserve.config import ModelConfig


class CacheFull(RuntimeError):
    pass


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device,
                 spares: list[torch.Tensor] | None = None, min_bytes: int = 0):
        """`spares`: byte buffers of dropped caches; the smallest that is large enough is taken from it.
        Without one, a new buffer of at least `min_bytes` (so that it may serve a larger cache later)."""
        shape = (num_slots + 1, cfg.num_kv_heads, max_len, cfg.head_dim)
        n = 2 * cfg.num_layers
        need = KVCache.nbytes(cfg, num_slots, max_len, dtype)
        where = torch.empty(0, device=device).device  # "cuda" and "cuda:0" alike
        fits = [b for b in spares or () if b.numel() >= need and b.device == where]
        if fits:
            buffer = min(fits, key=lambda b: b.numel())
            spares.remove(buffer)
        else:
            buffer = torch.zeros(max(need, min_bytes), dtype=torch.uint8, device=device)
        self.buffer = buffer
        views = buffer[:need].view(dtype).view(n, *shape).unbind(0)
        self.k, self.v = list(views[0::2]), list(views[1::2])
        self.num_slots, self.max_len, self.scratch = num_slots, max_len, num_slots
        self.free = list(range(num_slots))
        self.read_len = max_len
        self.span: tuple[int, int] | None = None  # slots lo..hi when the step's slots are contiguous

    @staticmethod
    def nbytes(cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * (num_slots + 1) * cfg.num_kv_heads * max_len * cfg.head_dim * dtype.itemsize

    def allocate(self) -> int:
        if not self.free:
            raise CacheFull("no free KV cache slot")
        self.free.sort()
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    def set_step(self, slots: list[int], read_len: int, views: bool = True) -> None:
        """Before a forward: how many positions attention reads, and whether slots form a range
        (then keys are a view, not a gather). Compiled steps pass views=False: one graph for all."""
        self.read_len = read_len
        lo = slots[0]
        contiguous = views and slots == list(range(lo, lo + len(slots)))
        self.span = (lo, lo + len(slots)) if contiguous else None

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where keys of tokens at `positions` [B, T] in `slots` [B] go, as rows of a layer's cache seen as
        [slots * heads * max_len, head_dim], in k's [B, T, H] order: one index for every layer's write."""
        heads = self.k[0].shape[1]
        h = torch.arange(heads, device=positions.device)
        return ((slots[:, None, None] * heads + h) * self.max_len + positions[:, :, None]).reshape(-1)

    def update(self, layer: int, slots: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, T, H, D] at `rows` (see rows()); return keys, values [B, H, L, D] of the step's
        slots and L."""
        kc, vc = self.k[layer], self.v[layer]
        D = kc.shape[-1]
        kc.view(-1, D).index_copy_(0, rows, k.reshape(-1, D))
        vc.view(-1, D).index_copy_(0, rows, v.reshape(-1, D))
        L = self.read_len
        if self.span is not None:
            lo, hi = self.span
            return kc[lo:hi, :, :L], vc[lo:hi, :, :L], L
        return kc[slots, :, :L], vc[slots, :, :L], L
