"""Text in and out: the expert's tokenizer and chat template through transformers. A base model with
no chat template gets a plain transcript format (`User: …\nAssistant:`) and stops at the next turn."""
from __future__ import annotations

import threading
from pathlib import Path

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

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
        """Token ids for a chat, plus stop strings the format implies."""
        for m in messages:
            if m.get("role") not in PLAIN_ROLES or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a role (system, user or assistant) and string content")
        if self.has_chat_template:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tok(text, add_special_tokens=False).input_ids), ()
        lines = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
        return self.encode("\n".join(lines) + "\nAssistant:"), PLAIN_STOP
