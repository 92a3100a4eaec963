"""``exact_match``: greedy generation against reference answers.

For each ``(prompt, answer)`` pair the model continues the prompt greedily for at most
``max_new_tokens`` tokens; the continuation is cut at the first ``stop`` string (default a
newline) and stripped, and it matches when it equals ``answer.strip()``. Score = the fraction of
pairs that match, in [0, 1]; higher is better. Set ``max_new_tokens`` a little above the
longest answer's token count.

Example:
    >>> t = ExactMatch("math", data=[("2+2=", "4"), ("3+3=", "6")], max_new_tokens=4)
    >>> t.score(model, tokenizer)                                       # doctest: +SKIP
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from evolution.tasks._base import FitnessTask
from evolution.tasks.registry import register_task

__all__ = ["ExactMatch"]


@register_task
class ExactMatch(FitnessTask):
    """Fraction of prompts whose greedy continuation equals the stripped answer."""

    name = "exact_match"

    task: str = "exact_match"  # registry name
    data: tuple[tuple[str, str], ...] = Field(min_length=1)  # (prompt, answer) pairs
    max_new_tokens: int = Field(default=16, ge=1)  # generation budget per prompt
    stop: str | None = "\n"  # the continuation is cut at its first occurrence; None: no cut

    def __init__(self, domain: str | None = None, data: Sequence[Sequence[str]] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        if domain is not None:
            kwargs["domain"] = domain
        if data is not None:
            kwargs["data"] = tuple(tuple(pair) for pair in data)
        super().__init__(**kwargs)

    def score(self, model: Any, tokenizer: Any) -> float:
        """Fraction of exact matches (greedy decoding, no sampling)."""
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        hits = 0
        with torch.inference_mode():
            for prompt, answer in self.data:
                ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = ids.to(device)  # (1, T)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                )  # (1, T + new)
                text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                if self.stop:
                    text = text.split(self.stop, 1)[0]
                hits += text.strip() == answer.strip()
        return hits / len(self.data)
