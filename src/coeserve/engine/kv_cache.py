"""The KV cache: per layer, one [slots, kv_heads, max_len, head_dim] tensor for keys and one for values,
allocated once. A sequence owns a slot for its life; its token at position p lives at index p.

A slot given back keeps what its sequence wrote, and the cache remembers those tokens (`release`), so a
later prompt that begins with them takes that slot, or a copy of their run, and skips their prefill
(`allocate_for`): the prefix cache, at a slot's granularity, least recently used slots given up first.
A multi-turn chat, whose next prompt is the last one plus the answer plus a new message, prefills only
the new message. Prompts in flight together that start alike (n samples of one prompt, chats with one
system prompt) share too: the engine copies the common start from the slot that computed it (`copy`).

The tensors may be carved from a byte buffer an earlier cache no longer needs (`spares=`), so a server
that makes caches for expert after expert zeroes its memory once, not at every switch. Positions a
sequence has not written hold zeros or an earlier sequence's finite values; attention never weighs them."""
from __future__ import annotations

import torch

from coeserve.config import ModelConfig


class CacheFull(RuntimeError):
    pass


MIN_REUSE = 8  # prompt tokens a kept slot must hold to be reused for them (fewer: computed again)


def common(a, b, limit: int) -> int:
    """Length of the common prefix of sequences a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device,
                 spares: list[torch.Tensor] | None = None, min_bytes: int = 0):
        """`spares`: byte buffers of dropped caches; the smallest that is large enough is taken from it.
        Without one, a new buffer of at least `min_bytes` (so that it may serve a larger cache later)."""
        shape = (num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
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
        self.num_slots, self.max_len = num_slots, max_len
        self.free = list(range(num_slots))
        self.kept: dict[int, list[int]] = {}  # free slot → the tokens whose keys and values it still holds
        self.used: dict[int, int] = {}  # slot → when it was last given back or copied from (`clock`)
        self.clock = 0
        self.read_len = max_len
        self.span: tuple[int, int] | None = None  # slots lo..hi when the step's slots are contiguous

    @staticmethod
    def nbytes(cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * num_slots * cfg.num_kv_heads * max_len * cfg.head_dim * dtype.itemsize

    def allocate(self) -> int:
        """The lowest free slot (low slots keep compiled steps' batches small); what it kept is dropped."""
        if not self.free:
            raise CacheFull("no free KV cache slot")
        return self._take(min(self.free))

    def allocate_for(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot for `prompt` and how many of its first tokens the slot holds. The free slot that
        holds the longest run of them (at least MIN_REUSE, and never the whole prompt: its last token must
        run to give logits) is taken when the prompt continues all it holds (a chat's next turn) or when
        it is the least recently used free slot anyway. Otherwise what it holds is kept for its own
        continuation: that run is copied into the least recently used free slot, which is taken (slots
        that hold nothing come first, lowest first). So chats that share a system prompt, served one
        after another, each keep their own conversation."""
        if not self.free:
            raise CacheFull("no free KV cache slot")
        best, reuse = None, 0
        for slot in self.free:
            n = common(self.kept.get(slot, ()), prompt, len(prompt) - 1)
            if n >= MIN_REUSE and n > reuse:
                best, reuse = slot, n
        victim = min(self.free, key=lambda s: (s in self.kept, self.used.get(s, 0), s))
        if best is not None and victim != best and len(self.kept[best]) > reuse:
            self.copy(best, victim, reuse)
            self._touch(best)
            best = victim
        return self._take(victim if best is None else best), reuse

    def _take(self, slot: int) -> int:
        self.free.remove(slot)
        self.kept.pop(slot, None)
        return slot

    def _touch(self, slot: int) -> None:
        self.clock += 1
        self.used[slot] = self.clock

    def release(self, slot: int, tokens: list[int] | None = None) -> None:
        """Give a slot back; `tokens`: those whose keys and values it holds at positions 0, 1, ..."""
        if slot not in self.free:
            self.free.append(slot)
            self._touch(slot)
            if tokens:
                self.kept[slot] = tokens

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions 0..n-1 of slot `src` into slot `dst`, every layer's keys and values."""
        for layer in (*self.k, *self.v):
            layer[dst, :, :n].copy_(layer[src, :, :n])

    def forget(self) -> None:
        """Drop what free slots hold (the expert's weights changed: their keys and values are stale)."""
        self.kept.clear()

    def set_step(self, slots: list[int], read_len: int, views: bool = True) -> None:
        """Before a forward: how many positions attention reads, and whether slots form a range
        (then keys are a view, not a gather). Compiled steps pass views=False: one graph for all."""
        self.read_len = read_len
        self.span = self.span_of(slots) if views else None

    @staticmethod
    def span_of(slots: list[int]) -> tuple[int, int] | None:
        """(lo, hi) when `slots` are lo, lo+1, ..., hi-1: their keys are then a view of the cache."""
        lo = slots[0]
        return (lo, lo + len(slots)) if slots == list(range(lo, lo + len(slots))) else None

    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where keys of tokens at `positions` [B, T] go, as rows of a layer's cache seen as
        [slots * heads * max_len, head_dim], in k's [B, T, H] order: one index for every layer's write.
        `slots` is [B] (every token of row b in slot b) or [B, T] (a slot per token: a packed step)."""
        heads = self.k[0].shape[1]
        h = torch.arange(heads, device=positions.device)
        s = slots if slots.dim() == positions.dim() else slots[:, None]
        return ((s[..., None] * heads + h) * self.max_len + positions[..., None]).reshape(-1)

    def write_at(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        """Write k, v [B, T, H, D] of tokens at `positions` [B, T] in `slots` [B] by indexing the cache
        itself. A compiled step writes so: there write()'s index_copy_ into a view of the cache becomes a
        copy of the whole layer's cache at every step (docs/engine.md)."""
        idx = slots[:, None].expand_as(positions)
        self.k[layer][idx, :, positions] = k
        self.v[layer][idx, :, positions] = v

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, T, H, D] at `rows` (see rows())."""
        kc, vc = self.k[layer], self.v[layer]
        D = kc.shape[-1]
        kc.view(-1, D).index_copy_(0, rows, k.reshape(-1, D))
        vc.view(-1, D).index_copy_(0, rows, v.reshape(-1, D))

    def read(self, layer: int, slots: torch.Tensor, length: int | None = None,
             span: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, L, D] of `slots`: a view when they are the range `span`, else a gather.
        Without `length` and `span`, the step's (set_step)."""
        kc, vc = self.k[layer], self.v[layer]
        if length is None:
            length, span = self.read_len, self.span
        if span is not None:
            lo, hi = span
            return kc[lo:hi, :, :length], vc[lo:hi, :, :length]
        return kc[slots, :, :length], vc[slots, :, :length]
