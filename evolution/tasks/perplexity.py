"""``perplexity``: how well the model predicts a fixed set of texts.

Score = minus the mean negative log-likelihood per predicted token, in nats, over all texts
(token-weighted: long texts count more). Higher is better; ``exp(-score)`` is the perplexity.
Each text is tokenized on its own (no special tokens added), truncated to ``max_length`` tokens
and scored in its own forward pass, so a text's contribution never depends on the others —
and the score is bit-for-bit repeatable on one device.

Example:
    >>> t = Perplexity("wiki", ["The cat sat.", "A dog ran."], max_length=32)
    >>> score = t.score(model, tokenizer)                               # doctest: +SKIP
    >>> math.exp(-score)   # the perplexity                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from evolution.tasks._base import FitnessTask
from evolution.tasks.registry import register_task

__all__ = ["Perplexity"]


@register_task
class Perplexity(FitnessTask):
    """Minus the mean token NLL of ``texts`` (higher is better)."""

    name = "perplexity"

    task: str = "perplexity"  # registry name
    texts: tuple[str, ...] = Field(min_length=1)  # texts to score; each needs >= 2 tokens
    max_length: int = Field(default=512, ge=2)  # tokens kept per text (the rest is cut)

    def __init__(self, domain: str | None = None, texts: Sequence[str] | None = None,
                 **data: Any) -> None:  # fmt: skip
        if domain is not None:
            data["domain"] = domain
        if texts is not None:
            data["texts"] = tuple(texts)
        super().__init__(**data)

    def score(self, model: Any, tokenizer: Any) -> float:
        """Minus the mean NLL per token over ``texts``.

        Raises:
            ValueError: no text yields two tokens (nothing to predict).
        """
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.inference_mode():
            for text in self.texts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = ids[:, : self.max_length].to(device)  # (1, T)
                if ids.shape[1] < 2:
                    continue
                logits = model(input_ids=ids).logits.float()  # (1, T, V)
                nll = torch.nn.functional.cross_entropy(
                    logits[0, :-1], ids[0, 1:], reduction="sum"
                )  # predict token t+1 from tokens <= t
                total += float(nll)
                count += ids.shape[1] - 1
        if count == 0:
            raise ValueError(
                f"perplexity task {self.domain!r}: no text has 2 or more tokens; give longer texts"
            )
        return -total / count
