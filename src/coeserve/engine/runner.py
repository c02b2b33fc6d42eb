"""One forward step of a model over the KV cache: decode one token for a batch, a packed pass that
decodes a batch and prefills prompt chunks together, or one chunk of one prompt. `fused=True` compiles
the decode step with torch.compile (and CUDA graphs on CUDA).

With `static=True` (the default for fused mode on CUDA, where CUDA graphs need it) a step has static
shapes: row i is slot i for the first bucket-size slots (the rows of free slots are padding) and the
attended length is rounded up to a multiple of LEN_BUCKET, so a few CUDA graphs, recorded once each,
serve every step. On CPU the compiled step keeps dynamic shapes, which measured faster (docs/engine.md)."""
from __future__ import annotations

import threading
from collections import defaultdict

import torch

from coeserve import kernels
from coeserve.engine.kv_cache import KVCache
from coeserve.engine.sampler import AheadPicker, TokenLogprob
from coeserve.engine.sequence import Sequence
from coeserve.models.common import Group, Layout


LEN_BUCKET = 256


class Runner:
    def __init__(self, model, kv: KVCache, device: torch.device, fused: bool = False,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), static: bool | None = None):
        self.model, self.kv, self.device = model, kv, device
        if device.type == "cpu" and kv.k[0].dtype == torch.float32:
            # Every fp32 CPU step takes our kernels once they are built (models/common), so they are
            # built before the first: a step's rounding must not depend on what ran earlier in the process.
            kernels.build()
        self.fused = fused
        self.static = fused and (device.type == "cuda" if static is None else static)
        self.buckets = tuple(b for b in buckets if b < kv.num_slots) + (kv.num_slots,)
        self._decode = self._compile() if fused else model
        self._compiled = {model: self._decode}

    def bind(self, model) -> None:
        """Step a model object bound to the same kind of weights elsewhere (another device slot); its
        compiled step is made once per model object, which lives as long as its slot."""
        if self.fused:
            # A slot's model object is rebound to each expert that enters the slot: its weights are new
            # tensor objects at the same addresses, unmarked, and a graph compiled for a new bucket
            # would take them as ordinary inputs (on CUDA, copied into the graph at every replay).
            self._mark(model)
        if model is not self.model:
            self.model = model
            if not self.fused:
                self._decode = model
            else:
                if model not in self._compiled:
                    self._compiled[model] = self._compile()
                self._decode = self._compiled[model]

    def _compile(self):
        import torch._dynamo

        # A static step compiles for its first batch bucket and for batch 1, and at a second bucket dynamo
        # makes the batch symbolic (dynamic=None): one compile more, not one per bucket (a 7B model takes
        # about a minute each). The attended length is an int input, not a guard. CUDA graphs are still
        # recorded per shape. The limit bounds what dynamo keeps in any case.
        limit = len(self.buckets) * (self.kv.max_len // LEN_BUCKET + 1)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        self._mark(self.model)
        if self.device.type == "cuda":
            return torch.compile(self.model, mode="reduce-overhead", dynamic=None if self.static else True)
        # On CPU the step's wrapper (buffers, kernel calls) is C++ too: a batch-1 SmolLM2 step spent
        # about 4 ms of ~45 in the Python one.
        return torch.compile(self.model, dynamic=None if self.static else True,
                             options={"max_autotune": True, "cpp_wrapper": True})

    def _mark(self, model) -> None:
        import torch._dynamo

        for t in list(model.w.values()) + self.kv.k + self.kv.v:
            # Their shapes never change: with dynamic shapes their sizes would be symbols too, and the
            # generated matmul loops would check bounds inside the inner loop.
            torch._dynamo.mark_static(t)
            if self.device.type == "cuda":
                # Weights (views into a slot) and the KV cache never move: CUDA graphs may read them in
                # place instead of copying them into graph-owned buffers each replay.
                torch._dynamo.mark_static_address(t)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, chunk: int) -> torch.Tensor | None:
        """Run the next chunk of the prompt; logits [V] once the prompt is all in, else None."""
        lo = seq.prefilled
        hi = min(len(seq.prompt_ids), lo + chunk)
        tokens = torch.tensor([seq.prompt_ids[lo:hi]], device=self.device)
        positions = torch.arange(lo, hi, device=self.device).unsqueeze(0)
        self.kv.set_step([seq.slot], hi)
        logits = self.model(tokens, positions, torch.tensor([seq.slot], device=self.device), self.kv)
        seq.prefilled = hi
        return logits[0] if hi == len(seq.prompt_ids) else None

    @torch.inference_mode()
    def packed(self, decoding: list[Sequence], chunks: list[tuple[Sequence, int, int]],
               every: list[int] = (), drafts: dict[Sequence, list[int]] | None = None) -> torch.Tensor:
        """One forward pass over a decode token of each of `decoding` (followed by its `drafts`, if any)
        and prompt tokens lo..hi of each of `chunks`, packed in a row: the weights are read once for all
        of them and no matmul row is padding. Logits [B, V] in that order (a chunk's at its last token),
        then, for each chunk numbered in `every`, at each of its positions that precede a prompt token
        (the prompt's logprobs), then at every position of each drafted sequence's tokens, in decoding
        order. Attention runs per group: the single-token rows in one batch, each longer row alone."""
        drafts = drafts or {}
        rows = [(s, s.length - 1, s.length + len(drafts.get(s, ())), [s.last_token, *drafts.get(s, ())])
                for s in decoding]
        rows += [(s, lo, hi, s.prompt_ids[lo:hi]) for s, lo, hi in chunks]
        tokens, positions, slots, last, starts, n = [], [], [], [], [], 0
        for s, lo, hi, ids in rows:
            starts.append(n)
            tokens += ids
            positions += range(lo, hi)
            slots += [s.slot] * (hi - lo)
            n += hi - lo
            last.append(n - 1)
        dev = self.device
        groups, order = [], []  # the packed token behind each row of the groups' blocks (None: no one's)
        single = [r for r in range(len(rows)) if rows[r][2] - rows[r][1] == 1]
        longer = [r for r in range(len(rows)) if rows[r][2] - rows[r][1] > 1]
        if single:
            group, src = self._single_token_group([(rows[r][0].slot, rows[r][1], starts[r]) for r in single],
                                                  max(rows[r][2] for r in single))
            groups.append(group)
            order += src
        for r in longer:  # each chunk attends alone, unpadded: 4.0 ms a layer for chunks of 211, 150, 100
            # and 50 tokens against 6.5 ms as one block padded to 211 (SDPA on CPU, SmolLM2 heads)
            s, lo, hi, _ = rows[r]
            groups.append(Group(torch.tensor([s.slot], device=dev), torch.arange(lo, hi, device=dev)[None],
                                hi, (s.slot, s.slot + 1), slice(starts[r], starts[r] + hi - lo)))
            order += range(starts[r], starts[r] + hi - lo)
        back = None
        if order != list(range(n)):  # padding, or groups out of the packed order: map each token back
            where = {}
            for row, tok in enumerate(order):
                if tok is not None:
                    where.setdefault(tok, row)
            back = torch.tensor([where[t] for t in range(n)], device=dev)
        for k in every:  # positions lo .. up to the one before the prompt's last token
            s, lo, hi, _ = rows[len(decoding) + k]
            start = starts[len(decoding) + k]
            last += range(start, start + min(hi, len(s.prompt_ids) - 1) - lo)
        for r, s in enumerate(decoding):
            if s in drafts:
                last += range(starts[r], starts[r] + 1 + len(drafts[s]))
        layout = Layout(groups, back, torch.tensor(last, device=dev))
        return self.model(torch.tensor([tokens], device=dev), torch.tensor([positions], device=dev),
                          torch.tensor([slots], device=dev), self.kv, layout=layout)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one forward pass; logits [B, V]."""
        tokens = [s.last_token for s in seqs]
        positions = [s.length - 1 for s in seqs]
        slots = [s.slot for s in seqs]
        read_len = max(s.length for s in seqs)
        step = self.model if self.model.layer_ready is not None else self._decode
        if step is self.model and KVCache.span_of(slots) is None:
            return self.packed(seqs, [])  # gaps in the slots: attend over their range (_single_token_group)
        if step is not self.model and self.device.type == "cuda":
            share_graph_trees()
        if self.static and step is not self.model:
            return self._static_decode(step, seqs, read_len)
        self.kv.set_step(slots, read_len, views=not self.static)
        # While a switch is still streaming layers in, the eager model waits on each one; the compiled
        # step (and its CUDA graphs) runs once the whole expert is in its slot.
        logits = step(torch.tensor(tokens, device=self.device)[:, None],
                      torch.tensor(positions, device=self.device)[:, None],
                      torch.tensor(slots, device=self.device), self.kv)
        return logits[: len(seqs)]

    def can_decode_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether `decode_ahead` can step these sequences: their weights are all in (no layer
        streaming) and the step needs no packed pass (static shapes, or slots that form a range)."""
        return self.model.layer_ready is None and (self.static or KVCache.span_of([s.slot for s in seqs]) is not None)

    @torch.inference_mode()
    def decode_ahead(self, seqs: list[Sequence], steps: int, ends=frozenset()
                     ) -> tuple[list[list[int]], list[list[TokenLogprob | None]] | None]:
        """`steps` decode passes in a row, each fed the tokens the last one's logits gave on the device
        (sampler.AheadPicker: the argmax, or sampled, after penalties and min_tokens' held-off `ends`),
        so the host queues every pass before it waits for any. On CUDA the device then runs them back to
        back instead of sitting idle while the host reads each token, samples and prepares the next
        step. The caller keeps every sequence within its limits for `steps` tokens, with nothing between
        logits and picking that needs the host (can_decode_ahead first). Tokens [steps][seqs], and their
        logprobs where asked for (None if no sequence asked)."""
        dev, step = self.device, self._decode
        if self.fused and dev.type == "cuda":
            share_graph_trees()
        slots = [s.slot for s in seqs]
        if self.static:  # row i is slot i; the rows of free slots are padding, as in _static_decode
            tokens, positions = self._static_rows(seqs)
            bucket = len(tokens)
            rows, step_slots = list(range(bucket)), torch.arange(bucket, device=dev)
            live = torch.zeros(bucket, 1, dtype=torch.long, device=dev)
            live[slots] = 1  # padding rows stay at their position
            row_seqs = [None] * bucket
            for s in seqs:
                row_seqs[s.slot] = s
        else:
            tokens, positions = [s.last_token for s in seqs], [s.length - 1 for s in seqs]
            rows, step_slots, live, row_seqs = slots, torch.tensor(slots, device=dev), 1, seqs
        pick = AheadPicker(row_seqs, steps, dev, ends)
        t, pos = torch.tensor(tokens, device=dev)[:, None], torch.tensor(positions, device=dev)[:, None]
        longest, out = max(s.length for s in seqs), []
        for k in range(steps):
            read_len = self._static_len(longest + k) if self.static else longest + k
            self.kv.set_step(rows, read_len)  # a range of slots: keys are views of the cache, as in one pass
            nxt = pick(step(t, pos, step_slots, self.kv), k)
            out.append(nxt)
            t, pos = nxt[:, None], pos + live
        picked = torch.stack(out)
        logprobs = pick.logprobs(picked)
        if self.static:
            picked = picked.index_select(1, torch.tensor(slots, device=dev))
            logprobs = logprobs and [[row[i] for i in slots] for row in logprobs]
        return picked.tolist(), logprobs

    def _static_decode(self, step, seqs: list[Sequence], read_len: int) -> torch.Tensor:
        """The compiled step at a static shape: row i is slot i for the first `bucket` slots, so every
        layer reads its keys as a view of the cache (a gather of every row's keys would move about 2 GB a
        step at batch 16 on a 7B model), and the attended length is rounded up to LEN_BUCKET. In a
        decode-only step every slot without a running sequence is free (a sequence still being prefilled
        makes the step a packed one), so the rows of those slots are padding and write only there, at
        the last position, which no sequence's kept prefix reaches (the cache keeps at most max_len - 1
        of a slot's positions) and a sequence overwrites before it reads it."""
        tokens, positions = self._static_rows(seqs)
        bucket = len(tokens)
        self.kv.set_step(list(range(bucket)), self._static_len(read_len))
        dev = self.device
        logits = step(torch.tensor(tokens, device=dev)[:, None], torch.tensor(positions, device=dev)[:, None],
                      torch.arange(bucket, device=dev), self.kv)
        return logits.index_select(0, torch.tensor([s.slot for s in seqs], device=dev))

    def _static_rows(self, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """A static step's input token and position for each row of the smallest bucket that holds the
        sequences' slots: a sequence's in its slot's row, padding (token 0 at the last position) in the rest."""
        bucket = next(b for b in self.buckets if b > max(s.slot for s in seqs))
        tokens, positions = [0] * bucket, [self.kv.max_len - 1] * bucket
        for s in seqs:
            tokens[s.slot], positions[s.slot] = s.last_token, s.length - 1
        return tokens, positions

    def _static_len(self, read_len: int) -> int:
        """The attended length of a static step: rounded up to LEN_BUCKET (one graph per bucket)."""
        return min(-(-read_len // LEN_BUCKET) * LEN_BUCKET, self.kv.max_len)

    def _src(self, src: list[int]) -> slice | torch.Tensor:
        """A group's packed tokens: a slice when they are a run, else an index."""
        if src == list(range(src[0], src[0] + len(src))):
            return slice(src[0], src[0] + len(src))
        return torch.tensor(src, device=self.device)

    def _single_token_group(self, members: list[tuple[int, int, int]], length: int
                            ) -> tuple[Group, list[int | None]]:
        """The group of a step's single-token rows, given (slot, position, packed token) of each, and the
        packed token behind each of its rows (None: a row that is no one's). When their slots have gaps
        (sequences that finished left them) but few, attention runs over the whole range of slots lo..hi,
        a view of the cache, with each query in its own slot's row (a gap's row attends to key 0 and is
        dropped), instead of gathering every layer's keys and values of those slots into new tensors."""
        dev = self.device
        slots = [m[0] for m in members]
        lo, hi = min(slots), max(slots) + 1
        if KVCache.span_of(slots) is None and hi - lo <= 2 * len(members):
            at = {slot: (pos, tok) for slot, pos, tok in members}
            src = [at[slot][1] if slot in at else None for slot in range(lo, hi)]
            pos = [[at[slot][0] if slot in at else 0] for slot in range(lo, hi)]
            index = torch.tensor([0 if t is None else t for t in src], device=dev)
            return Group(torch.arange(lo, hi, device=dev), torch.tensor(pos, device=dev), length, (lo, hi),
                         index), src
        src = [m[2] for m in members]
        return Group(torch.tensor(slots, device=dev), torch.tensor([[m[1]] for m in members], device=dev),
                     length, KVCache.span_of(slots), self._src(src)), src


_trees_lock, _trees, _thread = threading.Lock(), {}, threading.local()


def share_graph_trees() -> None:
    """Let this thread run compiled CUDA steps. torch.compile's CUDA graph trees keep their managers in
    thread-local state, which torch before 2.13 set up only on the thread that imported them (and on
    autograd's), failing an assert on any other (pytorch#123177): a server compiles on its start-up thread
    and steps on the scheduler's. Every thread here shares one set, that of the first thread to ask (its
    own, or new): graphs recorded in warm-up serve the loop, from one memory pool. Compiled steps never
    run on two threads at once (the scheduler's loop is the only stepper once it runs)."""
    if getattr(_thread, "shared", False):
        return
    from torch._inductor import cudagraph_trees as trees

    if not hasattr(trees, "local"):  # a torch that keeps them elsewhere
        _thread.shared = True
        return
    keys = ("tree_manager_containers", "tree_manager_locks")
    with _trees_lock:
        if not _trees:
            if all(hasattr(trees.local, k) for k in keys):
                _trees.update({k: getattr(trees.local, k) for k in keys})
            else:
                _trees.update({keys[0]: {}, keys[1]: defaultdict(threading.Lock)})
        for k in keys:
            setattr(trees.local, k, _trees[k])
    _thread.shared = True
