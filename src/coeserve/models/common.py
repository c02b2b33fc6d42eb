"""Parts shared by our decoder models: RMSNorm, rotary embeddings, attention over the slot KV cache,
and the `Decoder` base that builds on the meta device and binds weights as views into an expert image.

One forward call takes tokens [B, T] with their positions [B, T] and cache slots [B]: prefill is B=1 and
decode is T=1, so a whole decode batch runs in one pass. A packed call (`Layout`) takes the tokens of
several sequences in a row, [1, N], each with its own slot: decode rows and prompt chunks of different
lengths share one pass over the weights with no padding in the matmuls; only attention pads, per group.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coeserve import kernels
from coeserve.config import ModelConfig


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) with w in [out, in]. On CPU, fp32 (`bench/layout.py --batches ...` measures each
    path on the machine at hand):
    - 1-16 rows (a decode step), eager or compiled, take our kernel (kernels/), which reads the weights
      as several streams at once and each weight once: 1.3-1.5x the speed of MKL or of inductor's own
      reductions at one row, more at 4-16;
    - other calls (prefill, packed steps) take MKL (torch's BLAS) on Intel CPUs, where it beat oneDNN at
      every row count we measured (SmolLM2's layers at 517 rows, a packed step, 20.5-21.6 vs
      28.7-31.4 ms), and oneDNN on AMD, where MKL takes a slow generic path (1.5-1.6x slower); in a
      compiled step, oneDNN."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and _ONEDNN:
        shape = x.shape
        rows = x.numel() // shape[-1]
        small = kernels.small_linear()
        if rows <= SMALL_ROWS and small is not None and w.is_contiguous():
            y = small(x.reshape(rows, shape[-1]).contiguous(), w)
            return (y if b is None else y + b).view(*shape[:-1], w.shape[0])
        if not torch.compiler.is_compiling() and _intel():  # (dynamo would trace into _intel)
            return F.linear(x, w, b)
        # Inductor lowers the oneDNN op only for constant weights; ours are views into a slot, so under
        # torch.compile the call goes through an opaque custom op instead.
        op = torch.ops.coeserve.onednn_linear if torch.compiler.is_compiling() else _onednn
        return op(x.reshape(-1, shape[-1]), w, b).view(*shape[:-1], w.shape[0])
    return F.linear(x, w, b)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
SMALL_ROWS = 16  # up to this many rows, fp32 matmuls take kernels.small_linear when it is built


@functools.cache
def _intel() -> bool:
    """Is this an Intel CPU? There MKL (torch's BLAS) is fast; on AMD it takes a slow generic path."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(l.startswith("vendor_id") and "GenuineIntel" in l for l in f)
    except OSError:
        return False


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# Defined with torch.library rather than @custom_op: the plain dispatcher path costs a third of the
# per-call overhead, which matters at ~120 calls per decode step.
_LIB = torch.library.Library("coeserve", "DEF")
_LIB.define("onednn_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_LIB.impl("onednn_linear", _onednn, "CPU")


@torch.library.register_fake("coeserve::onednn_linear", lib=_LIB)
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == w.dtype == torch.float32:
        # Eager on CPU, our one-pass kernel (torch's runs as half a dozen kernels); compiled, inductor
        # fuses the norm into its loops.
        op = None if torch.compiler.is_compiling() else kernels.rms_norm()
        if op is not None and x.device.type == "cpu" and x.is_contiguous() and w.is_contiguous():
            return op(x, w, eps)
        return F.rms_norm(x, w.shape, w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * w.float()).to(x.dtype)


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return f
    if scaling.get("rope_type") == "linear":  # positions divided by `factor`
        return f / scaling["factor"]
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor, lo, hi = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / f
    smooth = ((old / wavelen) - lo) / (hi - lo)
    blended = (1 - smooth) * f / factor + smooth * f
    out = torch.where(wavelen > old / lo, f / factor, f)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, blended, out)


def rope_table(head_dim: int, theta: float, scaling: dict | None, length: int) -> torch.Tensor:
    """[length, head_dim] with cos in the first half of the last dim and sin in the second."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq(head_dim, theta, scaling))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def rope_factors(cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, T, 1, D] from a table's rows cs [B, T, D], in the form `apply_rope` takes."""
    half = cs.shape[-1] // 2
    cos, sin = cs[..., :half], cs[..., half:]
    return torch.cat([cos, cos], -1).unsqueeze(2), torch.cat([-sin, sin], -1).unsqueeze(2)


def apply_rope(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, T, H, D] rotated by `rope_factors` of its positions (rotate-half convention): x1*cos - x2*sin,
    x2*cos + x1*sin. Eager fp32 on CPU it is our one-pass kernel (kernels/rope.cpp, which may round the
    last bit differently: fused multiply-adds); else four kernels, which compiled steps fuse."""
    cos, sin = factors
    op = None if torch.compiler.is_compiling() else kernels.rope()
    if (op is not None and x.dtype == cos.dtype == torch.float32 and x.device.type == "cpu"
            and x.stride(-1) == 1 and cos.dim() == 4 and cos.shape[:2] == x.shape[:2]):
        return op(x, cos.contiguous(), sin.contiguous())  # eager on CPU: our one-pass kernel
    half = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos + torch.cat([xf[..., half:], xf[..., :half]], -1) * sin).to(x.dtype)


def attention_mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, L] bool: key j is visible to the query at position p when j <= p (and p - j < window)."""
    j = torch.arange(length, device=positions.device)
    p = positions.unsqueeze(-1)
    ok = j <= p
    if window:
        ok = ok & (j > p - window)
    return ok.unsqueeze(1)


@dataclass
class Group:
    """Sequences of a packed step that attend together, as a padded [B, T] block: their cache `slots` [B],
    their queries' `positions` [B, T] (a row shorter than T repeats its last position), the key `length`
    they read (and `span` when the slots are a range), and `src`, the packed tokens that make the block's
    B*T rows: a slice when they are a run with no padding, else an index."""
    slots: torch.Tensor
    positions: torch.Tensor
    length: int
    span: tuple[int, int] | None
    src: slice | torch.Tensor


@dataclass
class Layout:
    """How the N tokens of a packed step form sequences: the attention `groups`; `back`, where each packed
    token's row is in the groups' blocks laid end to end (None when that already is the packed order);
    and `last`, the token each sequence's logits come from."""
    groups: list[Group]
    back: torch.Tensor | None
    last: torch.Tensor


class Step:
    """What every layer of one forward call shares, made by the first layer that needs it and reused by
    the rest: the tokens' rotary factors per rope table, the attention mask per window (and group) and
    the rows the new keys and values go to in the cache. Per layer they cost a dozen small kernels, which
    in an eager decode step are a good part of the time outside the matmuls."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, kv, layout: Layout | None = None):
        self.positions, self.slots, self.kv, self.layout = positions, slots, kv, layout
        self._memo: dict = {}

    def _once(self, key, make: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def rope(self, name: str, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._once(name, lambda: rope_factors(table[self.positions]))

    def mask(self, length: int, window: int | None) -> torch.Tensor:
        return self._once(("mask", window), lambda: attention_mask(self.positions, length, window))

    def group_mask(self, g: int, window: int | None) -> torch.Tensor:
        group = self.layout.groups[g]
        return self._once(("mask", window, g), lambda: attention_mask(group.positions, group.length, window))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The layer's new keys and values into the cache: eagerly one index_copy_ at rows made once per
        call; in a compiled step by indexing (KVCache.write_at), which inductor writes in place."""
        if torch.compiler.is_compiling() and self.slots.dim() == 1:
            self.kv.write_at(layer, self.slots, self.positions, k, v)
        else:
            self.kv.write(layer, self._once("rows", lambda: self.kv.rows(self.slots, self.positions)), k, v)


class Decoder(nn.Module):
    """Base of our models. Subclasses define the layer (`block`) and the embedding scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_ready: Callable[[int], None] | None = None  # layer streaming (store/store.py sets it)

    # -- weights --------------------------------------------------------------------------------
    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make every parameter a view of the given tensors (no copy); they may live in a slot buffer."""
        missing = [n for n in self.param_names() if n not in tensors]
        if missing:
            raise ValueError(f"image lacks tensors: {', '.join(missing[:5])}")
        self.w = {n: tensors[n] for n in self.param_names()}
        self.embed = self.w["embed.weight"]
        self.head = self.w.get("lm_head.weight", self.embed)

    def param_names(self) -> list[str]:
        c = self.cfg
        names = ["embed.weight", "norm.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
        for i in range(c.num_layers):
            names += [f"layers.{i}.{n}.weight" for n in self.layer_params()]
            if c.attention_bias:
                names.append(f"layers.{i}.qkv.bias")
        return names

    def layer_params(self) -> list[str]:
        return ["attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down"]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv,
                layout: Layout | None = None) -> torch.Tensor:
        """Logits [B, V] at the final token of each row. With a `layout`,
        tokens and positions are [1, N] packed, `slots` [1, N] a slot per token, and the logits are
        those of the layout's sequences.

        While the weights are still arriving in a slot, `layer_ready(i)` blocks until part i is there:
        i = -1 the embedding, 0 … num_layers-1 the layers, num_layers the final norm and head."""
        ready = self.layer_ready
        if ready is not None:
            ready(-1)
        x = self.embed_tokens(tokens)
        step = Step(positions, slots, kv, layout)
        for i in range(self.cfg.num_layers):
            if ready is not None:
                ready(i)
            x = self.block(i, x, step)
        if ready is not None:
            ready(self.cfg.num_layers)
            self.layer_ready = None  # all of it has arrived: later steps may take the compiled path
        if layout is not None:
            x = x[0].index_select(0, layout.last)
        else:
            x = x[:, -1]
        x = rms_norm(x, self.w["norm.weight"], self.cfg.rms_norm_eps)
        return self.logits(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.head).float()
        cap = self.cfg.final_logit_softcapping
        return torch.tanh(out / cap) * cap if cap else out

    def qkv(self, i: int, h: torch.Tensor):
        c, w = self.cfg, self.w
        qkv = linear(h, w[f"layers.{i}.qkv.weight"], w.get(f"layers.{i}.qkv.bias"))
        B, T, _ = h.shape
        nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = qkv[..., :nq].view(B, T, c.num_heads, c.head_dim)
        k = qkv[..., nq:nq + nk].view(B, T, c.num_kv_heads, c.head_dim)
        v = qkv[..., nq + nk:].view(B, T, c.num_kv_heads, c.head_dim)
        return q, k, v

    def attend(self, i: int, q, k, v, step: Step, rope: str, window: int | None, scale: float,
               softcap: float | None) -> torch.Tensor:
        """`rope` names the table (an attribute) the layer's positions rotate by."""
        factors = step.rope(rope, getattr(self, rope))
        q, k = apply_rope(q, factors), apply_rope(k, factors)
        step.write(i, k, v)
        if step.layout is None:
            out = self._decode_attention(i, q, step.kv, step.slots, step.positions, window, scale, softcap)
            if out is not None:
                return out
            keys, values = step.kv.read(i, step.slots)
            return self._attention(q, keys, values, step.mask(step.kv.read_len, window), scale, softcap)
        N, H, D = q.shape[1], q.shape[2], q.shape[3]
        flat, outs = q.view(N, H, D), []
        for g, group in enumerate(step.layout.groups):
            B, T = group.positions.shape
            qg = flat[group.src] if isinstance(group.src, slice) else flat.index_select(0, group.src)
            out = self._decode_attention(i, qg.view(B, T, H, D), step.kv, group.slots, group.positions, window,
                                         scale, softcap)
            if out is None:
                keys, values = step.kv.read(i, group.slots, group.length, group.span)
                out = self._attention(qg.view(B, T, H, D), keys, values, step.group_mask(g, window), scale, softcap)
            outs.append(out.reshape(B * T, H * D))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if step.layout.back is not None:
            out = out.index_select(0, step.layout.back)
        return out.view(1, N, H * D)

    @staticmethod
    def _decode_attention(i: int, q, kv, slots, positions, window: int | None, scale: float,
                          softcap: float | None) -> torch.Tensor | None:
        """One query token per row, fp32 on CPU: our kernel reads each row's keys and values in its
        cache slot in place (kernels/decode_attention.cpp): about 36 µs a layer of a SmolLM2 batch-1 step
        where SDPA took about 100, with no mask and no gather when the slots are not a range.
        [B, 1, H * D], or None where it does not apply (then SDPA)."""
        op = kernels.decode_attention()
        B, T, H, D = q.shape
        if op is None or T != 1 or q.dtype != torch.float32 or q.device.type != "cpu" or slots.dim() != 1:
            return None
        out = op(q.reshape(B, H, D).contiguous(), kv.k[i], kv.v[i], slots, positions.reshape(B),
                 window or 0, scale, softcap or 0.0)
        return out.view(B, 1, H * D)

    def _attention(self, q, keys, values, mask, scale: float, softcap: float | None) -> torch.Tensor:
        """q [B, T, H, D] over keys, values [B, Hkv, L, D] under mask [B, 1, T, L]; [B, T, H * D]."""
        q = q.transpose(1, 2)  # [B, H, T, D]
        if softcap is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            rep = self.cfg.num_heads // self.cfg.num_kv_heads
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            s = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
            s = torch.tanh(s / softcap) * softcap
            s = s.masked_fill(~mask, float("-inf"))
            out = torch.matmul(torch.softmax(s, dim=-1), values.float()).to(q.dtype)
        B, H, T, D = out.shape
        return out.transpose(1, 2).reshape(B, T, H * D)

    def block(self, i, x, step: Step):  # pragma: no cover - subclasses define it
        raise NotImplementedError
