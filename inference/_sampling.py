"""Next-token selection: greedy, temperature, top-k, top-p, with a per-sequence seeded generator.

In a pipeline the last stage picks the tokens (``pick_tokens`` with a ``SampleSpec``), so only
``B`` token ids travel back instead of ``B x vocab`` logits. Seeded sampling is counter-based:
the draw for a sequence's ``n``-th token comes from a generator seeded with
``(seed + request index, n)``, so it depends on nothing else — not the process that samples, not
the micro-batch grouping, not a stage restart in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference._exceptions import InferenceError

__all__ = ["SampleSpec", "SamplingParams", "pick_tokens", "sample_next", "token_generator"]


@dataclass(frozen=True)
class SamplingParams:
    """How each sequence picks its next token."""

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before softmax
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set whose probability mass reaches p (1 = off)
    seed: int | None = None  # seeds each sequence's generator (seed + row index): reproducible sampling

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InferenceError(f"temperature must be >= 0, got {self.temperature}", setting="temperature")
        if self.top_k < 0:
            raise InferenceError(f"top_k must be >= 0, got {self.top_k}", setting="top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}", setting="top_p")

    @property
    def greedy(self) -> bool:
        """True when no randomness is involved."""
        return self.temperature == 0.0


def sample_next(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [B, V] float logits of the last position.
        params: the sampling settings.
        generators: one generator per row (None rows use the global RNG); ignored when greedy.

    Returns:
        LongTensor [B] of token ids.

    Example:
        >>> sample_next(torch.tensor([[0.1, 2.0, 0.3]]), SamplingParams(), [None]).tolist()
        [1]
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature  # [B, V]
    if params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)  # [B, V]
        probs = torch.softmax(sorted_scores, dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum - probs > params.top_p  # tokens past the nucleus (always keeps the first)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)  # [B, V]
    out = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(out)


def token_generator(seed: int, index: int) -> torch.Generator:
    """The generator for a sequence's ``index``-th token (``seed`` = run seed + request index).

    Example:
        >>> a = torch.rand(1, generator=token_generator(7, 3))
        >>> bool(a == torch.rand(1, generator=token_generator(7, 3)))
        True
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


@dataclass(frozen=True)
class SampleSpec:
    """What the last stage needs to pick one micro-batch step's tokens.

    ``seeds[i]`` is row ``i``'s sequence seed (None: the global RNG), ``counts[i]`` how many
    tokens that row has generated so far (the index of the token being picked).
    """

    params: SamplingParams
    seeds: tuple[int | None, ...]
    counts: tuple[int, ...]


def pick_tokens(logits: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (or ``[B, 1, V]``) as ``spec`` says.

    Returns:
        LongTensor [B].

    Example:
        >>> spec = SampleSpec(SamplingParams(), (None,), (0,))
        >>> pick_tokens(torch.tensor([[[0.1, 2.0, 0.3]]]), spec).tolist()
        [1]
    """
    if logits.ndim == 3:
        logits = logits[:, -1, :]
    if len(spec.seeds) != logits.shape[0] or len(spec.counts) != logits.shape[0]:
        raise InferenceError(f"sample spec for {len(spec.seeds)} rows, logits have {logits.shape[0]}",
                             setting="sample")
    if spec.params.greedy:
        return logits.argmax(dim=-1)
    gens = [None if seed is None else token_generator(seed, n) for seed, n in zip(spec.seeds, spec.counts)]
    return sample_next(logits, spec.params, gens)
