"""The engine on the real SmolLM2 expert: continuous batching, sampling, stop strings, limits, streaming."""
from __future__ import annotations

import collections
import math
from dataclasses import replace

import pytest
import torch

from coeserve.config import EngineConfig
from coeserve.engine.engine import Engine, PromptTooLong
from coeserve.engine.kv_cache import KVCache
from coeserve.engine.penalties import penalise
from coeserve.engine.sequence import SamplingParams, Sequence

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture()
def engine(smol):
    return Engine(smol, EngineConfig(max_batch=4, max_seq_len=512))


def chat_ids(expert, text):
    return expert.codec.chat_prompt([{"role": "user", "content": text}])[0]


def test_chat_template_from_gguf_is_used(smol):
    ids, stop = smol.codec.chat_prompt([{"role": "user", "content": "hi"}])
    text = smol.codec.tok.decode(ids)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert stop == ()


def test_base_model_gets_plain_format(gemma):
    assert not gemma.codec.has_chat_template
    ids, stop = gemma.codec.chat_prompt([{"role": "user", "content": "hi"}])
    assert gemma.codec.decode(ids).endswith("User: hi\nAssistant:")
    assert stop == ("\nUser:",)


def test_answers_a_question(engine, smol):
    [seq] = engine.generate([chat_ids(smol, "What is the capital of France?")],
                            SamplingParams(max_tokens=32, temperature=0))
    assert "Paris" in seq.text
    assert seq.finish_reason == "stop"  # ended on <|im_end|>


def test_continuous_batching_matches_running_alone(smol):
    prompts = [chat_ids(smol, q) for q in ("Name a color.", "What is 2+2? Explain briefly.",
                                          "Write a haiku about the sea.")]
    alone = [Engine(smol, EngineConfig(max_batch=1, max_seq_len=512)).generate([p], GREEDY)[0].output_ids
             for p in prompts]
    eng = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512))
    seqs = [eng.add(eng.make_sequence(prompts[0], GREEDY))]
    for _ in range(5):  # the first sequence is decoding when the others join
        eng.step()
    seqs += [eng.add(eng.make_sequence(p, GREEDY)) for p in prompts[1:]]
    batch_sizes = []
    while eng.has_work:
        eng.step()
        batch_sizes.append(len(eng.running))
    assert max(batch_sizes) == 3  # they really decoded together
    assert [s.output_ids for s in seqs] == alone


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_short_prompts_prefill_together_as_they_would_alone(which, request):
    """Prompts of different lengths admitted together prefill in one packed pass (all of them have a
    first token after one step) and then generate what each generates alone."""
    expert = request.getfixturevalue(which)
    prompts = [chat_ids(expert, q) for q in ("Hi.", "Name three rivers in Europe, please.", "Why is the sky blue?")]
    alone = [Engine(expert, EngineConfig(max_batch=1, max_seq_len=512)).generate([p], GREEDY)[0].output_ids
             for p in prompts]
    eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=512))
    seqs = [eng.add(eng.make_sequence(p, GREEDY)) for p in prompts]
    eng.step()
    assert [len(s.output_ids) for s in seqs] == [1, 1, 1]  # one pass prefilled all three
    eng.run_until_done()
    assert [s.output_ids for s in seqs] == alone


def test_a_pack_stays_within_the_prefill_budget(smol):
    """Three 40-token prompts with a 100-token budget: two whole prompts and 20 tokens of the third go in
    the first pass; the next pass decodes the first two and prefills the rest of the third."""
    prompt = chat_ids(smol, "Tell me about " + "the sea " * 12)[:40]
    eng = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512, prefill_chunk=100))
    seqs = [eng.add(eng.make_sequence(prompt, GREEDY)) for _ in range(3)]
    eng.step()
    assert [s.prefilled for s in seqs] == [40, 40, 20]
    assert [len(s.output_ids) for s in seqs] == [1, 1, 0]
    eng.step()
    assert [s.prefilled for s in seqs] == [40, 40, 40]
    assert [len(s.output_ids) for s in seqs] == [2, 2, 1]
    eng.run_until_done()
    assert seqs[0].output_ids == seqs[1].output_ids == seqs[2].output_ids


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_prompts_joining_a_decoding_batch_change_nothing(which, request):
    """Sequences that arrive while others decode prefill in the same passes as those decode steps (in
    chunks of a 24-token budget, a long prompt over several passes, next to short ones): every sequence
    generates what it generates alone, and no pass is decode-only until the prompts are in."""
    expert = request.getfixturevalue(which)
    prompts = [chat_ids(expert, q) for q in ("Why is the sky blue?", "Hi.",
                                            "Tell me about the rivers and mountains of Europe, please.", "Name a fruit.")]
    alone = [Engine(expert, EngineConfig(max_batch=1, max_seq_len=512)).generate([p], GREEDY)[0].output_ids
             for p in prompts]
    # No prefix cache: the joiners would copy the chat template's start from the first one's slot.
    eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=512, prefill_chunk=24, prefix_cache=False))
    seqs = [eng.add(eng.make_sequence(prompts[0], GREEDY))]
    for _ in range(3):
        eng.step()
    seqs += [eng.add(eng.make_sequence(p, GREEDY)) for p in prompts[1:]]
    before = len(seqs[0].output_ids)
    while any(s.prefilled < len(s.prompt_ids) for s in seqs):
        eng.step()
    steps = len(seqs[0].output_ids) - before
    assert steps == -(-sum(len(p) for p in prompts[1:]) // 24)  # each pass took 24 prompt tokens, and decoded
    eng.run_until_done()
    assert [s.output_ids for s in seqs] == alone


def test_a_new_cache_reuses_a_dropped_ones_memory(smol):
    """An engine made with a spare KV buffer takes it instead of zeroing new memory, and the stale keys
    and values an earlier expert left in it change nothing."""
    prompts = [chat_ids(smol, "Name a color."), chat_ids(smol, "Write a haiku about the sea.")]
    fresh = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512)).generate(prompts, GREEDY)
    used = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512))
    used.generate([chat_ids(smol, "Tell me a long story about a dragon. " * 4)] * 2, GREEDY)
    spares = [used.kv.buffer]
    again = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512), spares)
    assert again.kv.buffer is used.kv.buffer and spares == []
    assert [s.output_ids for s in again.generate(prompts, GREEDY)] == [s.output_ids for s in fresh]
    small = Engine(smol, EngineConfig(max_batch=4, max_seq_len=1024), [torch.zeros(16, dtype=torch.uint8)])
    assert small.kv.buffer.numel() == KVCache.nbytes(smol.cfg, 4, 1024, torch.float32)  # too small: not used


def test_more_requests_than_slots_all_finish(engine, smol):
    seqs = engine.generate([chat_ids(smol, f"Count to {i}.") for i in range(7)],
                           SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert all(len(s.output_ids) == 5 and s.finish_reason == "length" for s in seqs)
    assert sorted(engine.kv.free) == [0, 1, 2, 3]


def test_seed_reproducible_and_varies(engine, smol):
    ids = chat_ids(smol, "Tell me a story.")
    run = lambda seed: engine.generate([ids], SamplingParams(max_tokens=16, temperature=1.0, seed=seed,
                                                             ignore_eos=True))[0].output_ids
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_is_greedy(engine, smol):
    ids = chat_ids(smol, "Describe a cat.")
    greedy = engine.generate([ids], GREEDY)[0].output_ids
    topk = engine.generate([ids], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3,
                                                 ignore_eos=True))[0].output_ids
    tiny_p = engine.generate([ids], SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, seed=3,
                                                   ignore_eos=True))[0].output_ids
    full_min_p = engine.generate([ids], SamplingParams(max_tokens=24, temperature=1.5, min_p=1.0, seed=3,
                                                       ignore_eos=True))[0].output_ids
    assert topk == greedy == tiny_p == full_min_p


def test_logprobs_are_the_models_own_and_do_not_depend_on_the_batch(engine, smol):
    """Each output token's logprob and its top alternatives, as a decode step gives them, equal those a
    fresh prefill of the same text gives (another code path); a neighbour that asks for none is unchanged."""
    ids, hi = chat_ids(smol, "Name a large city."), chat_ids(smol, "hi")
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    top5 = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5)
    [seq], [other] = engine.generate([ids], top5), engine.generate([hi], plain)  # each alone
    both = [engine.add(engine.make_sequence(ids, top5)), engine.add(engine.make_sequence(hi, plain))]
    engine.run_until_done()
    assert both[1].output_ids == other.output_ids and both[1].logprobs == []
    assert [x.token for x in seq.logprobs] == seq.output_ids == both[0].output_ids
    for x, y in zip(seq.logprobs, both[0].logprobs):
        assert abs(x.logprob - y.logprob) < 1e-4
    for t, x in enumerate(seq.logprobs):
        assert len(x.top) == 5 and x.top[0] == (x.token, x.logprob)  # greedy: the chosen one is the best
        assert all(a[1] >= b[1] for a, b in zip(x.top, x.top[1:])) and x.logprob < 0
        assert sum(math.exp(lp) for _, lp in x.top) <= 1 + 1e-5
        if t in (0, 4, 9):
            [ref] = engine.generate([ids + seq.output_ids[:t]], SamplingParams(max_tokens=1, temperature=0,
                                                                               logprobs=5))
            r = ref.logprobs[0]
            assert r.token == x.token and [i for i, _ in r.top] == [i for i, _ in x.top]
            assert max(abs(a - b) for (_, a), (_, b) in zip(r.top, x.top)) < 1e-3


def test_penalties_pick_the_best_penalised_token(engine, smol):
    """With OpenAI's frequency and presence penalties each greedy token beats every raw top-20
    alternative once both are penalised by their counts so far; and the penalties change the output."""
    ids = chat_ids(smol, "Write the word 'dog' twenty times.")
    plain = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].output_ids
    [seq] = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=20,
                                                  frequency_penalty=1.0, presence_penalty=0.5))
    assert seq.output_ids != plain
    penalty = lambda tok, before: before.count(tok) * 1.0 + (tok in before) * 0.5
    for t, x in enumerate(seq.logprobs):
        before = seq.output_ids[:t]
        best = x.logprob - penalty(x.token, before)
        assert all(best >= lp - penalty(i, before) - 1e-4 for i, lp in x.top)
    rep = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                repetition_penalty=1.5))[0].output_ids
    assert rep != plain and max(collections.Counter(rep).values()) < max(collections.Counter(plain).values())


def test_a_temperature_too_small_to_divide_by_is_greedy(engine, smol):
    ids = chat_ids(smol, "What is the capital of France?")
    [greedy] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0))
    [tiny] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=1e-39, logit_bias=((5, 100.0),)))
    [tiny_plain] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=1e-39))
    assert tiny_plain.output_ids == greedy.output_ids and set(tiny.output_ids) == {5}


@pytest.mark.parametrize("shape, params", [
    ("peaked", dict(temperature=0.8, top_p=0.9)),  # the nucleus among the 256 most likely
    ("peaked", dict(temperature=1.3, top_k=5)),
    ("peaked", dict(temperature=1.0, min_p=0.05, top_p=0.95)),
    ("peaked", dict(temperature=1.0)),
    ("flat", dict(temperature=1.0, top_p=0.6)),  # thousands of tokens: the exponent histogram finds them
])
@pytest.mark.parametrize("batched", [False, True])
def test_sampling_draws_from_the_filtered_distribution(shape, params, batched):
    """Each draw takes the distribution that temperature, top-k, min-p and top-p leave, computed here by
    a full sort: 3000 seeded draws never take a token outside it, and the share of draws among its r most
    likely tokens is within 4 standard errors of its mass there, for every r. Row by row (CPU's) and
    batched (sample_batch, CUDA's: the 3000 draws as 3000 rows of one call, with a greedy row among them)."""
    from coeserve.engine.sampler import NUCLEUS, _sample_row, sample

    gen = torch.Generator().manual_seed(11)
    V = 1000 if shape == "peaked" else 6000
    logits = torch.randn(V, generator=gen) * (2.0 if shape == "peaked" else 0.3)
    p = SamplingParams(**params)
    x = logits / p.temperature
    if p.top_k:
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    ref = torch.softmax(x.double(), -1)
    if p.min_p:
        ref = ref * (ref >= p.min_p * ref.max())
        ref /= ref.sum()
    mass, order = ref.sort(descending=True)
    if p.top_p < 1:
        mass = mass * (mass.cumsum(0) - mass < p.top_p)
        mass /= mass.sum()
    kept = int((mass > 0).sum())
    assert p.top_p == 1 or (kept > NUCLEUS) == (shape == "flat")
    rank = torch.empty(V, dtype=torch.long)
    rank[order] = torch.arange(V)
    seq, n = Sequence([1], p), 3000
    if batched:
        seqs = [Sequence([1], replace(p, seed=i)) for i in range(n)]
        seqs.append(Sequence([1], SamplingParams(temperature=0)))
        tokens = sample(logits.expand(n + 1, V), seqs, batched=True)
        assert tokens[-1] == int(logits.argmax())
        drawn = rank[torch.tensor(tokens[:n])]
    else:
        drawn = torch.tensor([int(rank[_sample_row(logits.clone(), seq)]) for _ in range(n)])
    assert int(drawn.max()) < kept
    for r in sorted({1, 2, 3, 5, 10, 30, 100, kept // 2, kept}):
        want, got = float(mass[:r].sum()), float((drawn < r).float().mean())
        assert abs(got - want) <= 4 * (max(want * (1 - want), 0) / n) ** 0.5 + 1 / n, (r, got, want)


def test_penalise_values():
    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seq = Sequence([0], SamplingParams(repetition_penalty=2.0))
    seq.output_ids = [1, 3, 3]
    penalise(row, seq)
    assert row.tolist() == [1.0, -2.0, 0.5, 1.5]  # prompt and output tokens: positive halved, negative doubled
    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seq = Sequence([0], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    seq.output_ids = [1, 3, 3]
    penalise(row, seq)
    assert row.tolist() == [2.0, -1.75, 0.5, 1.75]  # output tokens only: 0.5 per time, 0.25 once
    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    penalise(row, Sequence([0], SamplingParams(logit_bias=((0, -100.0), (2, 1.5)))))
    assert row.tolist() == [-98.0, -1.0, 2.0, 3.0]


def test_logit_bias_and_stop_token_ids(engine, smol):
    """A bias of 100 makes a token the greedy choice at every step (a ban of -100 keeps it out); a stop
    token id ends the output before it, with finish reason stop, even with ignore_eos."""
    ids = chat_ids(smol, "What is the capital of France?")
    plain = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].output_ids
    forced = engine.generate([ids], SamplingParams(max_tokens=4, temperature=0, logit_bias=((plain[3], 100.0),)))
    assert forced[0].output_ids == [plain[3]] * 4
    [banned] = engine.generate([ids], SamplingParams(max_tokens=4, temperature=0.7, seed=3,
                                                     logit_bias=((plain[0], -100.0),)))
    assert plain[0] not in banned.output_ids
    [cut] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  stop_token_ids=(plain[5],)))
    assert cut.finish_reason == "stop" and cut.output_ids == plain[:plain.index(plain[5])]


def test_structured_output_follows_its_schema_regex_choice_and_grammar(engine, smol):
    """Each constrained sequence's text matches its constraint and ends (stop) where it is complete, in
    one batch with an unconstrained one that generates what it generates alone; sampled JSON parses too.
    A constraint that does not compile is a GrammarError when the sequence is made."""
    import json
    import re

    from coeserve.engine.grammar import GrammarError

    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    colours = '"red" | "green" | "blue"'
    asks = [("Describe a person as JSON.", ("json_schema", json.dumps(person)), 0.0),
            ("Give me a phone number.", ("regex", r"\d{3}-\d{4}"), 0.0),
            ("Is the sky blue?", ("choice", json.dumps(["yes", "no"])), 0.0),
            ("Name two colours.", ("ebnf", f"root ::= ({colours}) \" and \" ({colours})"), 0.0),
            ("Is water wet? Answer in JSON.", ("json_schema", json.dumps(flag)), 1.0),
            ("What is the capital of France?", None, 0.0)]
    seqs = [engine.add(engine.make_sequence(chat_ids(smol, q), SamplingParams(max_tokens=40, temperature=t, seed=7,
                                                                               grammar=g)))
            for q, g, t in asks]
    engine.run_until_done()
    assert all(s.finish_reason == "stop" for s in seqs[:5])
    person_out = json.loads(seqs[0].text)
    assert set(person_out) == {"name", "age"} and isinstance(person_out["name"], str)
    assert isinstance(person_out["age"], int)
    assert re.fullmatch(r"\d{3}-\d{4}", seqs[1].text) and seqs[2].text in ("yes", "no")
    assert re.fullmatch(r"(red|green|blue) and (red|green|blue)", seqs[3].text)
    assert isinstance(json.loads(seqs[4].text)["ok"], bool)
    [alone] = engine.generate([chat_ids(smol, asks[5][0])], SamplingParams(max_tokens=40, temperature=0))
    assert seqs[5].output_ids == alone.output_ids
    # With ignore_eos the output still ends where the grammar does.
    [yes_no] = engine.generate([chat_ids(smol, "Is the sky blue?")],
                               SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, grammar=asks[2][1]))
    assert yes_no.text == seqs[2].text and yes_no.finish_reason == "stop"
    # A grammar that compiles but admits no token ends its output there, sampled or greedy; the batch goes on.
    dead = [engine.add(engine.make_sequence(chat_ids(smol, "hi"), SamplingParams(temperature=t, grammar=g)))
            for t in (0.0, 0.9) for g in (("regex", r"[^\s\S]"), ("regex", r"a[^\s\S]"))]
    live = engine.add(engine.make_sequence(chat_ids(smol, asks[5][0]), SamplingParams(max_tokens=40, temperature=0)))
    engine.run_until_done()
    assert [(s.text, s.finish_reason) for s in dead] == [("", "stop"), ("a", "stop")] * 2
    assert live.output_ids == alone.output_ids
    # A grammar that fails in the engine (make_sequence was skipped) ends that sequence alone, with its error.
    broken = engine.add(Sequence(chat_ids(smol, "hi"), SamplingParams(grammar=("regex", "(unclosed"))))
    live = engine.add(engine.make_sequence(chat_ids(smol, asks[5][0]), SamplingParams(max_tokens=40, temperature=0)))
    engine.run_until_done()
    assert broken.finish_reason == "abort" and "does not compile" in broken.error and not broken.output_ids
    assert live.output_ids == alone.output_ids
    for bad in [("regex", "(unclosed"), ("json_schema", "{not json"), ("ebnf", "root ::= ")]:
        with pytest.raises(GrammarError, match="does not compile"):
            engine.make_sequence(chat_ids(smol, "hi"), SamplingParams(grammar=bad))


def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings(engine, smol):
    ids = chat_ids(smol, "What is the capital of France?")
    [short] = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0))
    n = len(short.output_ids)
    assert short.finish_reason == "stop" and n < 20 and "Paris" in short.text
    [held] = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0, min_tokens=n + 5))
    assert held.output_ids[:n] == short.output_ids and len(held.output_ids) >= n + 5
    # A stop string within the first min_tokens tokens cuts nothing; a stop token id is not sampled there.
    [kept] = engine.generate([ids], SamplingParams(max_tokens=n + 5, temperature=0, min_tokens=n + 5,
                                                   stop=("Paris",)))
    assert kept.output_ids == held.output_ids[:n + 5] and "Paris" in kept.text and kept.finish_reason == "length"
    [other] = engine.generate([ids], SamplingParams(max_tokens=n + 5, temperature=0, min_tokens=n + 5,
                                                    stop_token_ids=(short.output_ids[1],)))
    assert len(other.output_ids) == n + 5 and short.output_ids[1] not in other.output_ids


def test_stop_string_cuts_text(engine, smol):
    ids = chat_ids(smol, "What is the capital of France?")
    full = engine.generate([ids], SamplingParams(max_tokens=32, temperature=0))[0].text
    assert "Paris" in full
    streamed: list[str] = []
    seq = engine.add(engine.make_sequence(ids, SamplingParams(max_tokens=32, temperature=0, stop=("Paris",)),
                                          on_text=streamed.append))
    engine.run_until_done()
    assert seq.finish_reason == "stop"
    assert seq.text == full[: full.index("Paris")]
    assert "".join(streamed) == seq.text


def test_streaming_callback_concatenates_to_text(engine, smol):
    parts: list[str] = []
    seq = engine.add(engine.make_sequence(chat_ids(smol, "List three fruits."),
                                          SamplingParams(max_tokens=40, temperature=0), on_text=parts.append))
    engine.run_until_done()
    assert len(parts) > 3 and "".join(parts) == seq.text


def test_max_tokens_gives_length(engine, smol):
    [seq] = engine.generate([chat_ids(smol, "Write a long essay about rivers.")],
                            SamplingParams(max_tokens=7, temperature=0))
    assert len(seq.output_ids) == 7 and seq.finish_reason == "length"


def test_prompt_longer_than_context_is_a_clear_error(smol):
    eng = Engine(smol, EngineConfig(max_batch=2, max_seq_len=64))
    with pytest.raises(PromptTooLong, match="64"):
        eng.make_sequence(list(range(100, 200)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.make_sequence([], GREEDY)


def test_generation_stops_at_context_end(smol):
    eng = Engine(smol, EngineConfig(max_batch=2, max_seq_len=64))
    [seq] = eng.generate([chat_ids(smol, "Tell me everything about the ocean.")],
                         SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    assert seq.finish_reason == "length" and seq.length == 64


def test_long_prompt_prefills_in_chunks(smol):
    ids = chat_ids(smol, "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 30)
    whole = Engine(smol, EngineConfig(max_batch=1, max_seq_len=1024)).generate([ids], GREEDY)[0]
    chunked = Engine(smol, EngineConfig(max_batch=1, max_seq_len=1024, prefill_chunk=64)).generate([ids], GREEDY)[0]
    assert len(ids) > 200 and chunked.output_ids == whole.output_ids


def test_abort_frees_the_slot(engine, smol):
    seq = engine.add(engine.make_sequence(chat_ids(smol, "hi"), GREEDY))
    engine.step()
    engine.step()
    assert seq.slot >= 0
    engine.abort(seq)
    assert seq.finish_reason == "abort" and sorted(engine.kv.free) == [0, 1, 2, 3]
    engine.run_until_done()


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(min_p=1.5), dict(presence_penalty=3), dict(frequency_penalty=-2.5),
                                 dict(repetition_penalty=0), dict(logprobs=21), dict(logprobs=-1),
                                 dict(logit_bias=((5, 101.0),)), dict(logit_bias=((-1, 1.0),)),
                                 dict(stop_token_ids=(-3,)), dict(grammar=("yaml", "a: 1")),
                                 dict(max_tokens=4, min_tokens=5), dict(min_tokens=2, grammar=("regex", "a+"))])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_fused_mode_matches_unfused():
    """torch.compile'd decode gives the tokens of the eager one (random-weight tiny Llama, token ids only)."""
    import torch

    from coeserve.engine.engine import Expert
    from coeserve.engine.load import bind_image
    from coeserve.formats.synthetic import random_image, synthetic_config
    from coeserve.models import build_model

    cfg = synthetic_config("tiny")
    index, buf = random_image(cfg, seed=1)
    model = build_model(cfg, max_len=512)
    bind_image(model, buf, index, torch.float32)
    expert = Expert("tiny", cfg, model, None, torch.device("cpu"), torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 32]]
    # Unfused; fused with dynamic shapes (CPU default); fused with padded static shapes (CUDA default).
    # Batches of 3 (oneDNN) and 4 rows (our kernel, kernels/, in the compiled step too).
    configs = [dict(fused=False), dict(fused=True), dict(fused=True, static_shapes=True)]
    runs = [[s.output_ids for s in Engine(expert, EngineConfig(max_batch=5, max_seq_len=512, **c))
             .generate(p, GREEDY)] for c in configs for p in (prompts[:3], prompts)]
    assert runs[0] == runs[2] == runs[4] and runs[1] == runs[3] == runs[5]
    assert runs[0] == runs[1][:3] and all(len(r) == GREEDY.max_tokens for r in runs[1])
    # A lone sequence decodes at batch 1, where the fused step compiles its matmuls as reductions.
    alone = [Engine(expert, EngineConfig(max_batch=4, max_seq_len=512, fused=f)).generate(prompts[1:2], GREEDY)[0]
             .output_ids for f in (False, True)]
    assert alone[0] == alone[1] == runs[1][1]


def test_fused_steps_over_slots_with_gaps_match_unfused_in_few_graphs():
    """The static-shape compiled step (CUDA's) runs row i as slot i and the rows of free slots as
    padding: as sequences in low slots finish and a waiting one takes a freed slot, every sequence still
    gets the eager engine's tokens, and so does the dynamic-shape one (CPU's). Neither breaks its graph,
    and neither compiles more graphs than its shapes need (static: one batch bucket and one length
    bucket here; dynamic: batch 1 and the rest): a graph break or a recompile at every step would make
    fused mode slower than eager without changing a token."""
    from torch._dynamo.utils import counters

    from coeserve.engine.engine import Expert
    from coeserve.engine.load import bind_image
    from coeserve.formats.synthetic import random_image, synthetic_config
    from coeserve.models import build_model

    cfg = synthetic_config("tiny")
    index, buf = random_image(cfg, seed=2)
    model = build_model(cfg, max_len=512)
    bind_image(model, buf, index, torch.float32)
    expert = Expert("tiny", cfg, model, None, torch.device("cpu"), torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 32], [40, 41, 42, 43, 44]]
    budgets = [3, 6, 4, 16, 5]  # slots 0-2 finish while slot 3 runs; the fifth takes slot 0

    def run(**kw) -> tuple[list[list[int]], bool]:
        counters.clear()
        eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=512, **kw))
        seqs = [eng.add(eng.make_sequence(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
                for p, m in zip(prompts, budgets)]
        gapped = False
        while eng.has_work:
            slots = sorted(s.slot for s in eng.running)
            gapped |= bool(slots) and not eng.prefilling and slots != list(range(slots[0], slots[0] + len(slots)))
            eng.step()
        return [s.output_ids for s in seqs], gapped
    eager, _ = run()
    static, gapped = run(fused=True, static_shapes=True)
    assert gapped and static == eager and [len(o) for o in static] == budgets
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    dynamic, _ = run(fused=True)
    assert dynamic == eager and counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_prefix_cache_a_chat_prefills_only_its_new_turn_and_answers_as_a_cold_engine(which, request):
    """Each turn of a chat reuses the slot that holds the last turn (prompt and answer) and generates
    the tokens an engine without the prefix cache generates; a sequence in another slot in between
    changes nothing. (Gemma-3 has sliding-window layers: their window reads cached keys too.)"""
    expert = request.getfixturevalue(which)
    warm = Engine(expert, EngineConfig(max_batch=3, max_seq_len=1024))
    cold = Engine(expert, EngineConfig(max_batch=3, max_seq_len=1024, prefix_cache=False))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    msgs = [{"role": "system", "content": "You answer in one short sentence. " * 12}]
    before = 0
    for q in ("What is the capital of France?", "And of Spain?", "Which of the two is larger?"):
        msgs.append({"role": "user", "content": q})
        ids = expert.codec.chat_prompt(msgs)[0]
        other = warm.add(warm.make_sequence(chat_ids(expert, "Name a colour."), params))  # takes a slot too
        [seq] = warm.generate([ids], params)
        [ref] = cold.generate([ids], params)
        assert seq.output_ids == ref.output_ids and other.finished and ref.cached == 0
        assert seq.cached >= before  # at least the last turn's prompt (and with a chat template its answer)
        before = len(ids)
        msgs.append({"role": "assistant", "content": seq.text})
    assert seq.cached > 100 and len(ids) - seq.cached < 40  # the last turn prefilled little more than its message


def test_prompts_in_flight_together_share_their_common_start(smol):
    """Samples of one prompt and prompts with one system prompt, admitted together: the first computes
    the common start, the others copy it from its slot, and every one generates a cold engine's tokens.
    A sequence whose source is aborted before the copy computes the start itself."""
    system = "You are a terse assistant. Reply with one word. " * 6
    prompts = [smol.codec.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": q}])[0]
               for q in ("Name a colour.", "Name a colour.", "Name a fruit.")]
    start = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[2])) if a != b)
    eng = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512))
    seqs = eng.generate(prompts, GREEDY)
    cold = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512, prefix_cache=False)).generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in cold]
    assert [s.cached for s in seqs] == [0, len(prompts[1]) - 1, start] and start > 50
    eng = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512, prefill_chunk=32))
    src, waiter = eng.add(eng.make_sequence(prompts[0], GREEDY)), eng.add(eng.make_sequence(prompts[2], GREEDY))
    eng.step()
    assert waiter.source is not None and waiter.prefilled == 0 and src.prefilled == 32
    eng.abort(src)
    eng.run_until_done()
    assert waiter.cached == 0 and waiter.output_ids == cold[2].output_ids


def test_prefix_cache_keeps_what_an_aborted_prefill_wrote(smol):
    ids = chat_ids(smol, "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 12)
    eng = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512, prefill_chunk=64))
    seq = eng.add(eng.make_sequence(ids, GREEDY))
    eng.step()
    eng.abort(seq)
    assert seq.prefilled == 64
    [again] = eng.generate([ids], GREEDY)
    [cold] = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512, prefix_cache=False)).generate([ids], GREEDY)
    assert again.cached == 64 and again.output_ids == cold.output_ids


def test_a_reimported_expert_reuses_no_kept_prefix(smol):
    import dataclasses

    eng = Engine(smol, EngineConfig(max_batch=2, max_seq_len=512))
    eng.generate([chat_ids(smol, "What is the capital of France?")], GREEDY)
    eng.bind(dataclasses.replace(smol))  # the same import, acquired again
    assert eng.kv.kept
    eng.bind(dataclasses.replace(smol, version=("another", "import")))
    assert not eng.kv.kept


def test_kv_slots_kept_for_their_prefix():
    from coeserve.engine.kv_cache import MIN_REUSE
    from coeserve.formats.synthetic import synthetic_config

    kv = KVCache(synthetic_config("tiny"), 4, 64, torch.float32, "cpu")
    for layer in (*kv.k, *kv.v):
        layer.copy_(torch.randn_like(layer))
    a, b = list(range(100, 120)), list(range(200, 230))
    assert kv.allocate_for(a) == (0, 0) and kv.allocate_for(b) == (1, 0) and kv.allocate() == 2
    kv.release(0, a)
    kv.release(1, b)
    # Part of what slot 1 holds: its run is copied into the slot that holds nothing, and slot 1 keeps b.
    assert kv.allocate_for(b[:25] + [1, 2]) == (3, 25) and kv.kept[1] == b
    assert all(torch.equal(layer[3, :, :25], layer[1, :, :25]) for layer in (*kv.k, *kv.v))
    assert kv.allocate_for(a + [5]) == (0, 20)  # all slot 0 holds, continued: slot 0 itself
    kv.release(0, a)
    # Never the whole prompt (its last token must run); slot 1 (b) is the least recently used: given up.
    assert kv.allocate_for(list(a)) == (1, len(a) - 1) and 1 not in kv.kept and kv.kept[0] == a
    kv.release(1, b)
    # Too short to matter: the least recently used slot (0, last copied from before 1 came back), fresh.
    assert kv.allocate_for(a[:MIN_REUSE - 1] + [5, 6]) == (0, 0) and kv.kept == {1: b}
    kv.release(0, a)
    kv.forget()  # the weights changed
    assert kv.allocate_for(b + [1]) == (1, 0) and kv.allocate() == 0


def test_chats_served_one_after_another_each_keep_their_conversation(smol):
    """Three chats with one system prompt, their turns served one at a time on a 3-slot engine: each
    turn finds its whole chat so far (the turns of the others in between take other slots, copying the
    system prompt), and answers as a cold engine does."""
    system = "You answer in one short sentence and never more than that. " * 8
    chats = [[{"role": "system", "content": system}] for _ in range(3)]
    warm = Engine(smol, EngineConfig(max_batch=3, max_seq_len=1024))
    cold = Engine(smol, EngineConfig(max_batch=3, max_seq_len=1024, prefix_cache=False))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    before = [0, 0, 0]
    for turn, q in enumerate(("Name a city.", "Why that one?")):
        for c, msgs in enumerate(chats):
            msgs.append({"role": "user", "content": f"{q} ({c})"})
            ids = smol.codec.chat_prompt(msgs)[0]
            [seq], [ref] = warm.generate([ids], params), cold.generate([ids], params)
            assert seq.output_ids == ref.output_ids
            # Turn 1: the system prompt (but the first chat's), then the whole chat so far.
            assert seq.cached >= (before[c] if turn else 80 if c else 0), (turn, c)
            before[c] = len(ids)
            msgs.append({"role": "assistant", "content": seq.text})


def test_static_padding_leaves_kept_prefixes_intact():
    """The static compiled step (CUDA's) writes the rows of free slots as padding: not where a kept
    prefix lies, so a prompt that reuses a free slot after such steps still answers as a cold engine."""
    from coeserve.engine.engine import Expert
    from coeserve.engine.load import bind_image
    from coeserve.formats.synthetic import random_image, synthetic_config
    from coeserve.models import build_model

    cfg = synthetic_config("tiny")
    index, buf = random_image(cfg, seed=4)
    model = build_model(cfg, max_len=256)
    bind_image(model, buf, index, torch.float32)
    expert = Expert("tiny", cfg, model, None, torch.device("cpu"), torch.float32)
    first, long = list(range(50, 80)), [7, 8, 9]
    eng = Engine(expert, EngineConfig(max_batch=2, max_seq_len=256, fused=True, static_shapes=True))
    short = eng.add(eng.make_sequence(first, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    eng.add(eng.make_sequence(long, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    eng.run_until_done()  # after `short` ends, slot 0 is padding in the long one's steps
    follow = first + short.output_ids + [90, 91]
    [warm] = eng.generate([follow], GREEDY)
    [cold] = Engine(expert, EngineConfig(max_batch=2, max_seq_len=256, prefix_cache=False)).generate([follow], GREEDY)
    assert warm.cached == len(first) + 2 and warm.output_ids == cold.output_ids


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_a_batch_with_gaps_in_its_slots_decodes_as_each_alone(which, request):
    """When a sequence in the middle of the slots finishes, the others decode over the slot range with
    a gap in it (attention over the range's view, not a gather), and a prompt that joins then is
    prefilled in the same pass as that gapped batch: every sequence still generates what it generates
    alone."""
    expert = request.getfixturevalue(which)
    questions = ("Why is the sky blue?", "Hi.", "Name a river.", "Count to five.", "What is rain?")
    prompts = [chat_ids(expert, q) for q in questions]
    budgets = [20, 3, 6, 20, 4]  # slots 1 and then 2 finish early: gaps at 1, then 1-2
    alone = [Engine(expert, EngineConfig(max_batch=1, max_seq_len=512)).generate(
        [p], SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))[0].output_ids for p, m in zip(prompts, budgets)]
    eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=512))
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in budgets]
    seqs = [eng.add(eng.make_sequence(p, q)) for p, q in zip(prompts[:4], params)]
    def gapped():
        slots = sorted(s.slot for s in eng.running)
        return bool(slots) and slots != list(range(slots[0], slots[0] + len(slots)))

    gaps = joined_gapped = 0
    while eng.has_work:
        if gapped() and len(seqs) == 4 and len(eng.running) == 2:  # slots 0 and 3 decode: a prompt joins
            seqs.append(eng.add(eng.make_sequence(prompts[4], params[4])))
            joined_gapped += 1
        eng.step()
        gaps += gapped()
    assert joined_gapped == 1 and gaps >= 10
    assert [s.output_ids for s in seqs] == alone


def test_passes_queued_ahead_give_the_tokens_of_one_pass_a_step():
    """With decode_ahead (CUDA's default is 8), a batch that decodes greedily runs several passes per
    step, each fed the argmax of the last on the device. Unfused, compiled with dynamic shapes (CPU's)
    and with static shapes (CUDA's, over slots with gaps too), every sequence gets the tokens of one
    pass a step: through a stop token met inside a run of passes, max_tokens that are no multiple of
    it, sequences ending at different steps, and a prompt that joins between runs. A batch with a
    sampled sequence in it takes one pass a step, through the same compiled graphs."""
    from torch._dynamo.utils import counters

    from coeserve.engine.engine import Expert
    from coeserve.engine.load import bind_image
    from coeserve.formats.synthetic import random_image, synthetic_config
    from coeserve.models import build_model

    cfg = synthetic_config("tiny")
    index, buf = random_image(cfg, seed=5)
    model = build_model(cfg, max_len=256)
    bind_image(model, buf, index, torch.float32)
    expert = Expert("tiny", cfg, model, None, torch.device("cpu"), torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 32], [40, 41, 42]]
    budgets = [3, 13, 7, 22, 9]

    def run(params, **kw) -> tuple[list[list[int]], int]:
        eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=256, **kw))
        seqs = [eng.add(eng.make_sequence(p, q)) for p, q in zip(prompts[:4], params)]
        steps = 0
        while eng.has_work:
            if len(seqs) == 4 and seqs[0].finished:  # takes slot 0 while slot 2 may still be running
                seqs.append(eng.add(eng.make_sequence(prompts[4], params[4])))
            eng.step()
            steps += 1
        return [s.output_ids for s in seqs], steps

    greedy = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in budgets]
    reference, one_pass = run(greedy, decode_ahead=1)
    assert [len(o) for o in reference] == budgets and one_pass >= 22
    stop = reference[3][9]  # its first occurrence ends sequence 3 inside a run of passes
    stopping = [*greedy[:3], SamplingParams(max_tokens=22, temperature=0, stop_token_ids=(stop,)), greedy[4]]
    stopped = [*reference[:3], reference[3][:reference[3].index(stop)], reference[4]]
    assert len(stopped[3]) < 10
    # Graphs each compiles, as in one pass a step: none (eager); batch 1 and the rest; one batch bucket.
    for kw, graphs in ((dict(), 0), (dict(fused=True), 2), (dict(fused=True, static_shapes=True), 1)):
        counters.clear()
        out, steps = run(greedy, decode_ahead=4, **kw)
        # Unfused and dynamic steps run ahead only while the batch's slots form a range.
        assert out == reference and steps <= (one_pass / 2 if kw.get("static_shapes") else one_pass - 4), kw
        assert counters["stats"]["unique_graphs"] <= graphs and not counters["graph_break"], kw
        assert run(stopping, decode_ahead=4, **kw)[0] == stopped, kw
    # A sampled sequence holds the batch to one pass a step until it ends; then the rest run ahead,
    # through the graphs the single passes used.
    sampled = [greedy[0], SamplingParams(max_tokens=13, temperature=0.8, seed=3), *greedy[2:]]
    alone = run(sampled, decode_ahead=1)[0][1]
    for kw, graphs in ((dict(), 0), (dict(fused=True), 2), (dict(fused=True, static_shapes=True), 1)):
        counters.clear()
        mixed, steps = run(sampled, decode_ahead=4, **kw)
        assert mixed[1] == alone and mixed[:1] + mixed[2:] == reference[:1] + reference[2:], kw
        assert 14 <= steps < one_pass and counters["stats"]["unique_graphs"] <= graphs, kw
    # Sampling on the device (CUDA's default), sampled sequences run ahead too, each pass sampling all
    # rows at once from uniform numbers drawn beforehand: the seeds give the tokens of one pass a step.
    hot = [SamplingParams(max_tokens=m, temperature=0.9, top_p=0.9, top_k=40 * (i % 2), min_p=0.02 * i, seed=i,
                          ignore_eos=True) for i, m in enumerate(budgets)]
    hot[2] = greedy[2]
    one_hot, hot_steps = run(hot, decode_ahead=1, device_sampling=True)
    assert one_hot[2] == reference[2] and all(one_hot[i] != reference[i] for i in (1, 3, 4))
    for kw, graphs in ((dict(), 0), (dict(fused=True), 2), (dict(fused=True, static_shapes=True), 1)):
        counters.clear()
        out, steps = run(hot, decode_ahead=4, device_sampling=True, **kw)
        assert out == one_hot and steps <= (hot_steps / 2 if kw.get("static_shapes") else hot_steps - 4), kw
        assert counters["stats"]["unique_graphs"] <= graphs and not counters["graph_break"], kw
    # Penalties and logit bias on the device too, their token tables counting each pass's tokens: greedy
    # penalised sequences get the tokens of the row-by-row penalties (CPU's), and sampled ones those of
    # one pass a step.
    pen = [dict(logit_bias=((reference[0][1], -100.0),)), dict(repetition_penalty=1.3),
           dict(logit_bias=((reference[2][1], -100.0), (7, 3.0))), dict(presence_penalty=1.5, frequency_penalty=0.5),
           dict()]
    strict = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, **k) for m, k in zip(budgets, pen)]
    rowwise = run(strict, decode_ahead=1)[0]
    assert all(rowwise[i] != reference[i] for i in range(4)) and rowwise[4] == reference[4]
    loose = [replace(p, temperature=0.9, seed=i) if i % 2 else p for i, p in enumerate(strict)]
    one_loose = run(loose, decode_ahead=1, device_sampling=True)[0]
    assert one_loose[0] == rowwise[0] and one_loose[1] != rowwise[1]
    for kw in (dict(), dict(fused=True, static_shapes=True)):
        out, steps = run(strict, decode_ahead=4, device_sampling=True, **kw)
        assert out == rowwise and steps <= one_pass - 4, kw
        assert run(loose, decode_ahead=4, device_sampling=True, **kw)[0] == one_loose, kw
    # Logprobs and min_tokens on the device too: each token's logprobs as one pass a step gives them, and
    # a stop token held off until min_tokens as long.
    held = reference[3][2]
    asks = [replace(greedy[0], logprobs=2), SamplingParams(max_tokens=13, temperature=0.9, seed=2, logprobs=0),
            greedy[2], SamplingParams(max_tokens=22, temperature=0, stop_token_ids=(held,), min_tokens=10), greedy[4]]

    def with_logprobs(**kw):
        eng = Engine(expert, EngineConfig(max_batch=4, max_seq_len=256, device_sampling=True, **kw))
        seqs = [eng.add(eng.make_sequence(p, q)) for p, q in zip(prompts[:4], asks)]
        steps = 0
        while eng.has_work:
            eng.step()
            steps += 1
        return [s.output_ids for s in seqs], [s.logprobs for s in seqs], steps

    one_out, one_lps, one_steps = with_logprobs(decode_ahead=1)
    assert one_out[3][:2] == reference[3][:2] and held not in one_out[3][:10] and len(one_out[3]) >= 10
    assert [len(x) for x in one_lps] == [3, 13, 0, 0]
    for kw in (dict(), dict(fused=True, static_shapes=True)):
        out, lps, steps = with_logprobs(decode_ahead=4, **kw)
        assert out == one_out and steps < one_steps - 4, kw
        for mine, theirs in zip(lps, one_lps):
            assert [(x.token, [i for i, _ in x.top]) for x in mine] == [(x.token, [i for i, _ in x.top]) for x in theirs]
            assert all(abs(x.logprob - y.logprob) < 1e-5 for x, y in zip(mine, theirs)), kw


def test_ahead_picker_holds_ends_off_until_min_tokens():
    """Passes queued ahead hold a sequence's ends (end of sequence, stop token ids) off for exactly the
    passes before its min_tokens, and give each picked token's logprobs from the raw logits."""
    from coeserve.engine.sampler import AheadPicker

    seq = Sequence([1, 2], SamplingParams(max_tokens=10, temperature=0, min_tokens=3, stop_token_ids=(5,),
                                          logprobs=1))
    seq.output_ids = [7]  # two more tokens before an end may come
    logits = torch.zeros(1, 8)
    logits[0, 5], logits[0, 4], logits[0, 6] = 3.0, 2.0, 2.5  # 6: the end-of-sequence id
    pick = AheadPicker([seq], 4, torch.device("cpu"), frozenset({6}))
    picked = torch.stack([pick(logits, k) for k in range(4)])
    assert picked[:, 0].tolist() == [4, 4, 5, 5]
    lps = pick.logprobs(picked)
    raw = torch.log_softmax(logits[0], -1)
    assert [x[0].token for x in lps] == [4, 4, 5, 5] and all(x[0].top[0][0] == 5 for x in lps)
    assert abs(lps[0][0].logprob - raw[4].item()) < 1e-6 and abs(lps[3][0].logprob - raw[5].item()) < 1e-6


def test_prompt_lookup_drafts():
    """propose: what followed the latest earlier occurrence of the longest tail (3, then 2 tokens);
    accepted: the drafts up to the first the model did not choose, then the model's choice."""
    from coeserve.engine.speculate import accepted, propose

    assert propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 2) == [4, 5]
    assert propose([1, 2, 3, 7, 1, 2, 3, 8, 1, 2, 3], 4) == [8, 1, 2, 3]  # the latest occurrence
    assert propose([5, 2, 3, 6, 9, 9, 2, 3], 3) == [6, 9, 9]  # no 3-token tail before: 2 tokens
    assert propose([1, 2, 3, 4], 4) == [] and propose([1, 2, 1, 2], 0) == []
    assert propose([7, 8, 7, 8], 5) == [7, 8]  # stops at the end of what is known
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7] and accepted([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accepted([4], [3, 1]) == [3]


def test_speculation_gives_the_greedy_tokens(smol):
    """With draft tokens by prompt lookup (EngineConfig.speculate), greedy answers are the tokens of one
    at a time, in fewer steps where the answer repeats its prompt; sampled sequences in the same batch
    decode as without drafts, and a prompt joins mid-way."""
    passage = ("The museum opens at nine and closes at six. Tickets cost twelve euros for adults and six "
               "euros for children. Tours start every hour from the main hall.")
    prompts = [chat_ids(smol, f"Repeat this text exactly:\n\n{passage}"),
               chat_ids(smol, "Count from one to twenty in words, separated by commas."),
               chat_ids(smol, "Name three colours."), chat_ids(smol, f"Summarise: {passage}")]
    params = [SamplingParams(max_tokens=48, temperature=0, logprobs=2), SamplingParams(max_tokens=40, temperature=0),
              SamplingParams(max_tokens=12, temperature=0.8, seed=4), SamplingParams(max_tokens=20, temperature=0)]

    def run(k: int) -> tuple[list[list[int]], int, dict]:
        eng = Engine(smol, EngineConfig(max_batch=4, max_seq_len=512, speculate=k))
        seqs = [eng.add(eng.make_sequence(p, q)) for p, q in zip(prompts[:3], params)]
        steps = 0
        while eng.has_work:
            if steps == 5:
                seqs.append(eng.add(eng.make_sequence(prompts[3], params[3])))
            eng.step()
            steps += 1
        return [s.output_ids for s in seqs], steps, eng.speculation, seqs[0].logprobs

    plain, plain_steps, _, plain_lps = run(0)
    drafted, steps, counts, lps = run(4)
    assert drafted == plain and counts["accepted"] >= 20 and steps <= 0.7 * plain_steps, (steps, plain_steps, counts)
    # A kept draft's logprobs come from the logits at its position in the drafted row.
    assert [x.token for x in lps] == plain[0] and [[i for i, _ in x.top] for x in lps] == [
        [i for i, _ in x.top] for x in plain_lps]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(lps, plain_lps)) < 1e-3
