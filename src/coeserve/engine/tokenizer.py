"""Text in and out: the expert's tokenizer and chat template through transformers. A base model with
no chat template gets a plain transcript format (`User: …\nAssistant:`) and stops at the next turn."""
from __future__ import annotations

import functools
import re
import threading
from pathlib import Path
from typing import Callable

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)
_IMPORT = threading.Lock()  # transformers' lazy first import is not thread-safe


class Codec:
    def __init__(self, tok_dir: Path, eos_ids: tuple[int, ...] = ()):
        with _IMPORT:
            from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(tok_dir))
        ids = set(eos_ids)
        if self.tok.eos_token_id is not None:
            ids.add(self.tok.eos_token_id)
        self.eos_ids = frozenset(ids)
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`; `special`: with the tokens the tokenizer adds (a BOS, for one)."""
        return list(self.tok(text, add_special_tokens=special).input_ids)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def piece(self, token: int) -> tuple[str, list[int]]:
        """A token's own text and bytes, as logprobs show it (OpenAI's `token` and `bytes`). A token
        that holds part of a character (byte-level BPE, or SentencePiece's <0xNN> byte fallback) has
        text '\ufffd' and its true bytes, so that the bytes of consecutive tokens join into the text."""
        if token not in self._pieces:
            text = self.tok.decode([token], skip_special_tokens=False)
            raw = self.tok.convert_ids_to_tokens(token) or ""
            data = text.encode()
            if "\ufffd" in text:
                hexbyte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)
                if hexbyte:
                    data = bytes([int(hexbyte.group(1), 16)])
                elif "ByteLevel" in repr(getattr(getattr(self.tok, "backend_tokenizer", None), "decoder", None)):
                    table = _byte_decoder()
                    if all(c in table for c in raw):
                        data = bytes(table[c] for c in raw)
            self._pieces[token] = (text, list(data))
        return self._pieces[token]

    def stream(self) -> "TextStream":
        return TextStream(self.decode)

    @property
    def takes_tools(self) -> bool:
        """Does the chat template render tool definitions (and tool messages)?"""
        return self.has_chat_template and "tools" in self.tok.chat_template

    def chat_prompt(self, messages: list[dict], generation: bool = True,
                    tools: list[dict] | None = None) -> tuple[list[int], tuple[str, ...]]:
        """Token ids for a chat (`generation`: ending where the assistant's answer begins; `tools`: for a
        template that takes them), plus stop strings the format implies."""
        roles = (*PLAIN_ROLES, "tool") if self.takes_tools else tuple(PLAIN_ROLES)
        for m in messages:
            if m.get("role") not in roles or not isinstance(m.get("content"), str):
                raise ValueError(f"each message needs a role ({', '.join(roles)}) and string content")
        if self.has_chat_template:
            try:
                text = self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation,
                                                    tokenize=False)
            except Exception as e:  # the template's own raise_exception (e.g. roles out of order), or a bad field
                raise ValueError(f"the chat template refused the messages: {e}") from None
            return list(self.tok(text, add_special_tokens=False).input_ids), ()
        lines = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
        return self.encode("\n".join(lines) + ("\nAssistant:" if generation else "")), PLAIN_STOP


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes, back to the bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


class TextStream:
    """The text of generated tokens, one token at a time, in work that does not grow with the output:
    each new token is decoded within a short window of the tokens before it (the incremental
    detokenisation of vLLM and of tokenizers' DecodeStream), so that a token's leading space and a
    character split across tokens come out as decode() of the whole output gives them. Text is held
    back while it ends in an unfinished character; `flush` gives what is held at the end."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window ids[prefix:read] is context only; ids[read:] is not out yet

    def _new_text(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def push(self, token: int) -> str:
        """Add a token; the text that is now final (may be empty)."""
        self.ids.append(token)
        return self._new_text(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of the output)."""
        return self._new_text(final=True) if self.read < len(self.ids) else ""
