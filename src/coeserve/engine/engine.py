"""The step loop with continuous batching. Each `step()` is one forward pass: a token for every running
sequence and, when prompts are waiting, up to `prefill_chunk` of their tokens (whole short prompts, and
the next chunk of a longer one), packed in one row so the weights are read once for all of it and no
matmul row is padding. Sequences join and leave the batch between steps. The engine is driven by one
thread; other threads hand it work through `submit`.
"""
from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass

import torch

from coeserve.config import EngineConfig, ModelConfig
from coeserve.engine import grammar, speculate
from coeserve.engine.kv_cache import MIN_REUSE, KVCache, common
from coeserve.engine.output import emit, extend
from coeserve.engine.runner import Runner
from coeserve.engine.sampler import NONE, logprobs_of, prompt_logprobs, sample, token_logprobs
from coeserve.engine.sequence import SamplingParams, Sequence, Status
from coeserve.engine.tokenizer import Codec

# Greedy decode passes queued at once on CUDA (Engine._ahead): at batch 1 on a 7B model each costs ~5 ms
# of device time, so 8 delay a joining prompt by ~40 ms at most.
DECODE_AHEAD = 8
WAIT_REUSE = 64  # prompt tokens worth waiting a step for, to copy them from a sequence computing them


class PromptTooLong(ValueError):
    pass


@dataclass
class Expert:
    """A loaded expert: config, model bound to weights, and tokenizer."""
    name: str
    cfg: ModelConfig
    model: object
    codec: Codec | None  # None: token ids in and out, no text (random-weight benchmark experts)
    device: torch.device
    dtype: torch.dtype
    version: object = None  # which import of the expert's weights (a re-import changes it)


class Engine:
    def __init__(self, expert: Expert, config: EngineConfig = EngineConfig(), kv_spares: list | None = None,
                 kv_min_bytes: int = 0):
        """`kv_spares`: KV memory of dropped engines; the cache takes one that is large enough, or makes a
        buffer of at least `kv_min_bytes`."""
        self.expert, self.config = expert, config
        self.max_len = self._max_len(expert.cfg, expert.model.max_len, config)
        self.kv = KVCache(expert.cfg, config.max_batch, self.max_len, expert.dtype, expert.device, kv_spares,
                          kv_min_bytes)
        self.runner = Runner(expert.model, self.kv, expert.device, fused=config.fused,
                             buckets=config.batch_buckets, static=config.static_shapes)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.decode_ahead = config.decode_ahead if config.decode_ahead is not None else \
            (DECODE_AHEAD if expert.device.type == "cuda" else 1)
        self.device_sampling = config.device_sampling if config.device_sampling is not None else \
            expert.device.type == "cuda"
        self.speculation = {"drafted": 0, "accepted": 0}  # draft tokens checked, and kept (EngineConfig.speculate)

    @staticmethod
    def _max_len(cfg: ModelConfig, model_len: int, config: EngineConfig) -> int:
        return min(config.max_seq_len, cfg.max_position, model_len)

    @staticmethod
    def kv_bytes(cfg: ModelConfig, dtype: torch.dtype, model_len: int, config: EngineConfig) -> int:
        """The KV cache an engine needs, in bytes, for a model of `cfg` built for `model_len` positions."""
        return KVCache.nbytes(cfg, config.max_batch, Engine._max_len(cfg, model_len, config), dtype)

    def bind(self, expert: Expert) -> None:
        """Run on `expert` from now on: the same expert, re-acquired (its model object may be another
        slot's). Sequences in flight keep their KV cache."""
        if expert.cfg != self.expert.cfg:
            raise ValueError(f"engine for {self.expert.name} cannot run {expert.name}: another model config")
        if expert.version != self.expert.version:
            self.kv.forget()  # re-imported: what free slots hold came from the old weights
        self.expert = expert
        self.runner.bind(expert.model)

    # -- requests -------------------------------------------------------------------------------
    def make_sequence(self, prompt_ids: list[int], params: SamplingParams, on_text=None) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_len:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this expert's context holds "
                                f"{self.max_len} (prompt plus at least one generated token)")
        if params.grammar is not None:
            if self.expert.codec is None:
                raise ValueError("structured output needs an expert with a tokenizer")
            grammar.compiled(self.expert.codec, *params.grammar, self.expert.cfg.vocab_size)  # GrammarError
        return Sequence(list(prompt_ids), params, on_text)

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence (engine thread only)."""
        self.waiting.append(seq)
        return seq

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence from any thread; it joins at the next step."""
        self.inbox.put(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            self._finish(seq, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or not self.inbox.empty())

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One scheduling step; returns the sequences that finished in it."""
        done: list[Sequence] = []
        self._drain_inbox()
        self._admit()
        self._copy_shared()
        decoding = list(self.running)
        chunks = self._chunks()
        k = self.config.speculate  # draft tokens by prompt lookup (engine/speculate.py)
        drafts = speculate.drafts(decoding, k, self.max_len) if k else {}
        ahead = 1 if chunks or drafts else self._ahead(decoding)
        if ahead > 1:
            tokens, logprobs = self.runner.decode_ahead(decoding, ahead, self._eos())
            for k, row in enumerate(tokens):
                for i, (seq, tok) in enumerate(zip(decoding, row)):
                    if not seq.finished:
                        self._append(seq, tok, done, logprobs[k][i] if logprobs else None)
            return done
        if chunks or drafts:
            logits, decoding = self._packed(decoding, chunks, drafts, done)
        elif decoding:
            logits = self.runner.decode(decoding)
        else:
            return done
        rows = list(decoding)
        for seq, lo, hi in chunks:
            seq.prefilled = hi
            if hi == len(seq.prompt_ids):
                self.prefilling.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
                rows.append(seq)
            else:
                logits = logits[:len(rows)]  # only the last chunk may stop short of its prompt's end
        for seq in rows:
            if seq.params.grammar and seq.matcher is None:
                try:
                    seq.matcher = grammar.matcher(self.expert.codec, seq.params.grammar, self.expert.cfg.vocab_size)
                except grammar.GrammarError as e:  # its own failure, not the batch's (make_sequence checks first)
                    seq.error = str(e)
                    self._finish(seq, "abort", done)
        tokens = sample(logits, rows, self._held_off(rows), batched=self.device_sampling)
        for seq, tok, lp in zip(rows, tokens, token_logprobs(logits, rows, tokens)):
            if not seq.finished:
                self._append(seq, tok, done, lp)
        return done

    def _packed(self, decoding: list[Sequence], chunks: list[tuple[Sequence, int, int]],
                drafts: dict[Sequence, list[int]], done: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """The step's packed pass: the prompt chunks (with their prompts' logprobs) and the drafted
        sequences, which take their tokens here. The logits and the decoding sequences left to sample,
        as a plain step samples them."""
        every = [i for i, (s, _, _) in enumerate(chunks) if s.params.prompt_logprobs is not None]
        logits = self.runner.packed(decoding, chunks, every, drafts)
        n = len(decoding) + len(chunks)
        logits, extra = logits[:n], logits[n:]
        used = prompt_logprobs([chunks[i] for i in every], extra)
        if drafts:
            self._speculated(decoding, drafts, extra[used:], done)
            keep = [i for i, s in enumerate(decoding) if s not in drafts]
            logits = logits[keep + list(range(len(decoding), n))]
            decoding = [decoding[i] for i in keep]
        return logits, decoding

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        seqs = [self.add(self.make_sequence(p, params)) for p in prompts]
        self.run_until_done()
        return seqs

    # -- internals ------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())

    def _ahead(self, seqs: list[Sequence]) -> int:
        """Decode passes this step queues at once (EngineConfig.decode_ahead): several when every
        sequence takes the most likely token with nothing between the logits and the choice, or picks
        on the device (device_sampling: sampling, penalties, min_tokens, logprobs), with no grammar, and
        no prompt could join, as many as the nearest limit (max_tokens, the context) allows. A sequence that stops
        earlier (end of sequence, stop string) wastes the passes left; the steps of the others are unchanged."""
        n = self.decode_ahead
        if n < 2 or not seqs or (self.waiting and self.kv.free) or self.prefilling or not self.inbox.empty():
            return 1
        for s in seqs:
            p = s.params
            host = not p.greedy or p.penalised or p.logprobs is not None or len(s.output_ids) < p.min_tokens
            if (host and not self.device_sampling) or p.grammar is not None:
                return 1
            n = min(n, p.max_tokens - len(s.output_ids), self.max_len - s.length)
        return n if n > 1 and self.runner.can_decode_ahead(seqs) else 1

    def _speculated(self, decoding: list[Sequence], drafts: dict[Sequence, list[int]], logits: torch.Tensor,
                    done: list[Sequence]) -> None:
        """Each drafted sequence's tokens from the logits at its last token's and drafts' positions: the
        drafts the model would have chosen, in order, then the model's own choice (speculate.accepted)."""
        choices, row = logits.argmax(dim=-1).tolist(), 0
        for seq in (s for s in decoding if s in drafts):
            n = len(drafts[seq]) + 1
            tokens = speculate.accepted(drafts[seq], choices[row:row + n])
            k = seq.params.logprobs  # each kept token's from the logits it was chosen from, as in one pass
            lps = logprobs_of(logits[row:row + len(tokens)], tokens, k) if k is not None else [None] * len(tokens)
            row += n
            self.speculation["drafted"] += n - 1
            self.speculation["accepted"] += len(tokens) - 1
            # Next time one draft more than were kept: after a miss, one draft costs one row a pass; a
            # run of hits soon drafts the most again.
            seq.draft_len = min(self.config.speculate, len(tokens))
            for tok, lp in zip(tokens, lps):
                if not seq.finished:
                    self._append(seq, tok, done, lp)

    def _chunks(self) -> list[tuple[Sequence, int, int]]:
        """Prompt tokens lo..hi of sequences from the front of the prefill queue, at most `prefill_chunk`
        in all: whole prompts while they fit, then a first chunk of the next (only the last may be partial)."""
        chunks, budget = [], self.config.prefill_chunk
        for seq in self.prefilling:
            if budget == 0:
                break
            if seq.source is not None:
                continue  # its start is being computed in another slot (_share)
            lo = seq.prefilled
            hi = min(len(seq.prompt_ids), lo + budget)
            chunks.append((seq, lo, hi))
            budget -= hi - lo
        return chunks

    def _admit(self) -> None:
        while self.waiting and self.kv.free:
            seq = self.waiting.popleft()
            if seq.finished:  # aborted while waiting
                continue
            # A prompt's logprobs need every position computed: none are taken from the cache.
            reuse = self.config.prefix_cache and seq.params.prompt_logprobs is None
            if reuse:
                seq.slot, seq.cached = self.kv.allocate_for(seq.prompt_ids)
            else:
                seq.slot, seq.cached = self.kv.allocate(), 0
            seq.prefilled = seq.cached
            if reuse:
                self._share(seq)
            seq.status = Status.PREFILL
            self.prefilling.append(seq)

    def _share(self, seq: Sequence) -> None:
        """If a sequence in flight has a prompt that starts as `seq`'s does, further than what seq's slot
        holds, seq copies that start from its slot (n samples of one prompt, chats with one system prompt)
        instead of computing it again: at once if it is computed, else after waiting for it, which costs
        seq a step and so only pays for a long start (WAIT_REUSE tokens)."""
        best, n = None, seq.cached
        for other in (*self.running, *self.prefilling):
            m = common(other.prompt_ids, seq.prompt_ids, len(seq.prompt_ids) - 1)
            if m > n and (m >= WAIT_REUSE or (m >= MIN_REUSE and other.prefilled >= m)):
                best, n = other, m
        seq.source = (best, n) if best is not None else None

    def _copy_shared(self) -> None:
        """Copy into each waiting sequence's slot the start its source has now computed."""
        for seq in self.prefilling:
            if seq.source is None:
                continue
            src, n = seq.source
            if src.slot < 0:  # the source ended first (an abort): compute it after all
                seq.source = None
            elif src.prefilled >= n:
                self.kv.copy(src.slot, seq.slot, n)
                seq.prefilled = seq.cached = n
                seq.source = None

    def _eos(self) -> frozenset:
        codec = self.expert.codec
        return codec.eos_ids if codec else frozenset(self.expert.cfg.eos_token_ids)

    def _held_off(self, rows: list[Sequence]) -> dict[int, list[int]] | None:
        """Rows whose min_tokens is not reached yet, and the tokens that would end them."""
        ban = {i: sorted(self._eos() | set(s.params.stop_token_ids)) for i, s in enumerate(rows)
               if len(s.output_ids) < s.params.min_tokens}
        return ban or None

    def _append(self, seq: Sequence, token: int, done: list[Sequence], logprob=None) -> None:
        p, eos = seq.params, self._eos()
        if token == NONE:  # its grammar allows nothing more: the output ends here
            extend(self.expert.codec, seq, None)
            return self._finish(seq, "stop", done)
        # A grammar's output ends with the end-of-sequence token it alone then allows (even with ignore_eos).
        complete = seq.matcher is not None and seq.matcher.accept_token(token) and seq.matcher.is_terminated()
        if (token in eos and not p.ignore_eos) or token in p.stop_token_ids or complete:
            extend(self.expert.codec, seq, None)
            return self._finish(seq, "stop", done)
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        last = len(seq.output_ids) >= p.max_tokens or seq.length >= self.max_len
        if extend(self.expert.codec, seq, token, last):
            return self._finish(seq, "stop", done)
        if last:
            return self._finish(seq, "length", done)
        emit(seq, final=False)

    def _finish(self, seq: Sequence, reason: str, done: list[Sequence] | None = None) -> None:
        seq.finish_reason = reason
        if reason != "abort":
            emit(seq, final=True)
        seq.status = Status.FINISHED
        if seq.slot >= 0:
            # The keys and values written: the prompt as far as prefilled, then each output token but
            # the last (the next step would have fed it).
            written = seq.prompt_ids[:seq.prefilled] if seq.prefilled < len(seq.prompt_ids) else \
                (seq.prompt_ids + seq.output_ids)[:seq.length - 1]
            self.kv.release(seq.slot, written if self.config.prefix_cache else None)
            seq.slot = -1
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if done is not None:
            done.append(seq)
