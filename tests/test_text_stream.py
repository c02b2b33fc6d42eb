"""Incremental detokenisation (engine/tokenizer.py TextStream): the text streamed token by token is the
text of decoding the whole output at once, for both built-in tokenizers (byte-level BPE and
SentencePiece with byte fallback), with characters split across tokens held back until whole."""
import random

import pytest

from coeserve.engine.engine import Engine
from coeserve.engine.sequence import SamplingParams
from coeserve.config import EngineConfig

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand new lines\n\n",
    "Prix: 12,50 € — naïve café, Straße, smörgåsbord.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 🙂🚀👍🏽 and 🇫🇷 flags; math: ∑ x² ≤ ∞.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
]


def streamed(codec, ids):
    stream, pieces = codec.stream(), []
    for t in ids:
        pieces.append(stream.push(t))
    pieces.append(stream.flush())
    return pieces


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_streamed_text_is_the_whole_decode(which, request):
    codec = request.getfixturevalue(which).codec
    for text in TEXTS:
        ids = codec.encode(text)
        pieces = streamed(codec, ids)
        assert "".join(pieces) == codec.decode(ids)
        assert all("\ufffd" not in p for p in pieces)  # a split character comes out whole, once complete
        assert sum(1 for p in pieces[:-1] if p) > len(ids) // 3  # text comes out as tokens arrive


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_token_pieces_bytes_join_into_the_text(which, request):
    """A token's (text, bytes) as logprobs show it: the bytes of a text's tokens join into the text, also
    where a character is split across tokens (its tokens' text is then U+FFFD)."""
    codec = request.getfixturevalue(which).codec
    texts = TEXTS + ["a rare character: \U000e0041 (a tag letter), in bytes"]  # byte fallback in SentencePiece
    for text in texts:
        ids = codec.tok(text, add_special_tokens=False).input_ids
        pieces = [codec.piece(t) for t in ids]
        assert bytes(b for _, data in pieces for b in data).decode() == codec.decode(ids)
        assert all(t == bytes(data).decode() for t, data in pieces if "\ufffd" not in t)
    assert any("\ufffd" in codec.piece(t)[0] for text in texts for t in codec.tok(text).input_ids)


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_random_tokens_stream_as_they_decode(which, request):
    """Any token sequence, byte tokens that never make a valid character included."""
    codec = request.getfixturevalue(which).codec
    rng = random.Random(7)
    vocab = len(codec.tok)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(60)]
        assert "".join(streamed(codec, ids)) == codec.decode(ids)


def test_a_decoder_that_strips_the_first_space_keeps_the_others():
    """SentencePiece-style decoders (Llama 2, Mistral) drop the leading space of the first token they
    see: a token decoded alone loses its space, so each token is decoded after the ones before it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from coeserve.engine.tokenizer import TextStream

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    ids = tok.encode("the lazy fox jumps, hello world").ids
    whole = tok.decode(ids)
    assert whole == "the lazy fox jumps, hello world" and "".join(tok.decode([i]) for i in ids) != whole
    stream = TextStream(tok.decode)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == whole


def test_engine_text_and_stream_agree_with_whole_decode_and_stop_strings(smol):
    """A long generation: seq.text is decode(output_ids); a stop string that spans tokens far into the
    output cuts the text right before it, and streaming never passed any of it on."""
    ids = smol.codec.chat_prompt([{"role": "user", "content": "Write a long story about a dragon."}])[0]
    engine = Engine(smol, EngineConfig(max_batch=2, max_seq_len=1024))
    whole = engine.generate([ids], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))[0]
    assert whole.text == smol.codec.decode(whole.output_ids) and len(whole.text) > 400
    stop = whole.text[300:306]
    first = whole.text.index(stop)
    parts = []
    seq = engine.add(engine.make_sequence(ids, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True,
                                                               stop=(stop, "never appears")),
                                          on_text=parts.append))
    engine.run_until_done()
    assert seq.finish_reason == "stop" and seq.text == whole.text[:first] == "".join(parts)
