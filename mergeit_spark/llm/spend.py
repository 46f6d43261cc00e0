"""What LLM requests cost: tokens told apart into prompt and completion, and the user's prices.

The merge stage's caps (``merge.max_requests``, ``max_total_tokens``, ``max_cost``) count what the
ledger records (``llm.ledger``: a spend line per request before it is sent, a settle line with what
it used). The ledger records tokens, never money: cost is the tokens at the prices of the run that
reads them, so a price stated later applies to everything already spent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..config import LLMSettings


@dataclass(frozen=True)
class Prices:
    """What the endpoint charges per million prompt and per million completion tokens
    (``llm.price_input_per_million`` / ``llm.price_output_per_million``, in the account's currency;
    0 = free). No price is built in: hosted prices change without notice, so the user states them."""
    input_per_million: float = 0.0
    output_per_million: float = 0.0
    batch_discount: float = 0.0   # the share a Batch API request takes off (llm.price_batch_discount)

    @classmethod
    def from_settings(cls, llm: LLMSettings) -> "Prices":
        return cls(llm.price_input_per_million, llm.price_output_per_million, llm.price_batch_discount)

    def batch(self) -> "Prices":
        """The prices of a request sent through the Batch API."""
        keep = 1.0 - self.batch_discount
        return Prices(self.input_per_million * keep, self.output_per_million * keep)

    def of(self, batch: bool) -> "Prices":
        """The prices of an online (False) or a batch (True) request."""
        return self.batch() if batch else self

    def cost(self, prompt_tokens: int, completion_tokens: int, unsplit_tokens: int = 0) -> float:
        """The price of the tokens; ``unsplit_tokens`` (ledger lines written before prompt and
        completion were recorded apart) at the higher of the two rates, so a cap never counts low."""
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
                + unsplit_tokens * max(self.input_per_million, self.output_per_million)) / 1e6


class Tokens(NamedTuple):
    """The tokens of one request: what a spend line reserved (the prompt estimate and
    ``llm.max_tokens``) or what its settle line says the server used."""
    prompt: int = 0
    completion: int = 0
    unsplit: int = 0   # ledger lines written before prompt and completion were recorded apart

    @property
    def total(self) -> int:
        return self.prompt + self.completion + self.unsplit

    @classmethod
    def of(cls, line: dict[str, Any]) -> "Tokens":
        """The tokens of a spend or settle line."""
        total, prompt = int(line.get("tokens") or 0), int(line.get("prompt_tokens") or 0)
        completion = int(line.get("completion_tokens") or 0)
        return cls(prompt, completion, max(0, total - prompt - completion))

    def cost(self, prices: Prices) -> float:
        return prices.cost(self.prompt, self.completion, self.unsplit)


class Spent(NamedTuple):
    """Requests, tokens and their cost at given prices, as the ledger records them; ``tokens``
    split into prompt and completion where the lines say (older lines do not)."""
    requests: int = 0
    tokens: int = 0
    cost: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
