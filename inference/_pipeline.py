"""Pipelined generation: micro-batches kept in flight across the stages.

Requests are split into ``microbatches`` groups; each group owns a KV-cache slot on every
stage (one row per sequence, prompts left-padded). The scheduler starts the prefill of every
group, then, whenever any group's next tokens come back (the last stage picks them: only token
ids travel back, not logits), submits its next decode step — so while stage 1 works on group
A, stage 0 already works on group B.

Every token a group has been fed is kept (``history``): when a stage dies, the scheduler waits
for its replacement and replays each unfinished group's history as one prefill, which rebuilds
every stage's cache; generation then continues where it stopped. A replay is marked ``fresh``:
each stage drops what the slot held before running it, whatever order the earlier drop and any
stale step of that slot reach the stage in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference._exceptions import InferenceError
from inference._sampling import SampleSpec, SamplingParams
from inference._stage import position_ids_from_mask
from inference._transport import StageLostError, StepInput, Transport

__all__ = ["GenerationStats", "TokenEvent", "run_generation", "run_generation_steps"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (``finished`` is set on the request's last one)."""

    request: int  # index of the prompt in the caller's list
    token_id: int  # the new token
    index: int  # 0 for the first generated token
    finished: bool  # True on the request's last token
    finish_reason: str | None = None  # "stop" or "length" when finished


@dataclass
class GenerationStats:
    """Timings of one run_generation call."""

    wall_s: float = 0.0  # first submit to last token
    ttft_s: list[float] = field(default_factory=list)  # time to first token, per request
    tokens: int = 0  # generated tokens
    steps: int = 0  # pipeline steps submitted
    recoveries: list[float] = field(default_factory=list)  # seconds from a stage loss to resumed steps


@dataclass
class _Group:
    slot: str
    rows: list[int]  # request indices, one per row
    history: torch.Tensor  # [B, L] every token fed so far
    mask: torch.Tensor  # [B, L] 1 = real, 0 = pad
    generated: list[list[int]]  # per row
    done: list[bool]  # per row
    seeds: tuple[int | None, ...]  # per row: the run seed + request index (None: unseeded/greedy)
    pending: Any = None  # transport handle of the step in flight
    fed: int = 0  # columns of history already in every stage's cache


def _make_groups(prompts: Sequence[Sequence[int]], microbatches: int, pad_id: int,
                 sampling: SamplingParams, tag: str) -> list[_Group]:
    n = len(prompts)
    m = max(1, min(microbatches, n))
    groups = []
    for g in range(m):
        rows = list(range(g, n, m))  # round-robin keeps groups balanced
        width = max(len(prompts[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = list(prompts[r])
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)  # left padding
            mask[i, width - len(p):] = 1
        seeds = tuple(None if sampling.greedy or sampling.seed is None else sampling.seed + r for r in rows)
        groups.append(_Group(slot=f"{tag}-{g}", rows=rows, history=ids, mask=mask,
                             generated=[[] for _ in rows], done=[False] * len(rows), seeds=seeds))
    return groups


def _submit(transport: Transport, g: _Group, sampling: SamplingParams, replay: bool = False) -> None:
    start = 0 if replay else g.fed
    new = g.history.shape[1] - start
    spec = SampleSpec(sampling, g.seeds, tuple(len(gen) for gen in g.generated))  # the last stage picks
    step = StepInput(slot=g.slot, input_ids=g.history[:, start:], attention_mask=g.mask,
                     position_ids=position_ids_from_mask(g.mask, new), sample=spec, fresh=replay)
    g.pending = transport.submit(step)
    g.fed = g.history.shape[1]


def run_generation(transport: Transport, prompts: Sequence[Sequence[int]], **kwargs: Any) -> Iterator[TokenEvent]:
    """Like ``run_generation_steps`` but one TokenEvent at a time (same arguments)."""
    for step in run_generation_steps(transport, prompts, **kwargs):
        yield from step


def run_generation_steps(transport: Transport, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         sampling: SamplingParams | None = None, microbatches: int = 1,
                         stop_ids: Sequence[int] = (), pad_id: int = 0, tag: str = "gen",
                         stats: GenerationStats | None = None,
                         max_recoveries: int = 3) -> Iterator[list[TokenEvent]]:
    """Generate for every prompt through ``transport``, yielding tokens as they are sampled.

    Args:
        transport: where the stages run (local, threaded or Ray).
        prompts: token id lists, one per request.
        max_new_tokens: tokens to generate per request (fewer if a stop token comes).
        sampling: greedy by default; temperature/top-k/top-p/seed otherwise.
        microbatches: groups kept in flight at once.
        stop_ids: token ids that end a request (the stop token is yielded).
        pad_id: id used for left padding (masked out).
        tag: prefix of the KV-cache slot names (unique per concurrent call).
        stats: filled with timings when given.
        max_recoveries: stage losses survived before giving up.

    Yields:
        The TokenEvents of one micro-batch step (one per still-running row), as steps finish.
        The group's next step is already submitted when its tokens are yielded, so a slow
        consumer does not stall the pipeline.

    Raises:
        InferenceError: bad arguments; StageError when stages do not come back.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InferenceError("every prompt needs at least one token", setting="prompts")
    if max_new_tokens < 1:
        raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}", setting="max_new_tokens")
    sampling = sampling or SamplingParams()
    stats = stats if stats is not None else GenerationStats()
    stops = set(stop_ids)
    groups = _make_groups(prompts, microbatches, pad_id, sampling, tag)
    t0 = time.perf_counter()
    first_token: dict[int, float] = {}
    recoveries = 0
    try:
        for g in groups:
            _submit(transport, g, sampling)
            stats.steps += 1
        active = {id(g.pending): g for g in groups}
        while active:
            try:
                done = transport.wait([g.pending for g in active.values()])
                for handle in done:
                    g = active.pop(id(handle))
                    nxt = transport.fetch(handle)  # [B] token ids, picked by the last stage
                    events = []
                    for i, r in enumerate(g.rows):
                        if g.done[i]:
                            continue
                        tok = int(nxt[i])
                        g.generated[i].append(tok)
                        first_token.setdefault(r, time.perf_counter() - t0)
                        reason = "stop" if tok in stops else ("length" if len(g.generated[i]) >= max_new_tokens else None)
                        g.done[i] = reason is not None
                        stats.tokens += 1
                        events.append(TokenEvent(request=r, token_id=tok, index=len(g.generated[i]) - 1,
                                                 finished=g.done[i], finish_reason=reason))
                    if all(g.done):
                        transport.drop(g.slot)
                    else:
                        col = torch.tensor([[pad_id if d else gen[-1]] for d, gen in zip(g.done, g.generated)])
                        live = torch.tensor([[0 if d else 1] for d in g.done], dtype=torch.long)
                        g.history = torch.cat([g.history, col], dim=1)  # [B, L+1]
                        g.mask = torch.cat([g.mask, live], dim=1)
                        _submit(transport, g, sampling)  # next step in flight before the caller sees these tokens
                        stats.steps += 1
                        active[id(g.pending)] = g
                    yield events
            except StageLostError:
                recoveries += 1
                if recoveries > max_recoveries:
                    raise
                lost_at = time.perf_counter()
                transport.recover()
                active.clear()
                for g in (g for g in groups if not all(g.done)):  # drop everywhere, replay the whole history
                    transport.drop(g.slot)
                    _submit(transport, g, sampling, replay=True)
                    stats.steps += 1
                    active[id(g.pending)] = g
                stats.recoveries.append(time.perf_counter() - lost_at)
        unfinished = [r for g in groups for r, d in zip(g.rows, g.done) if not d]
        if unfinished:
            raise InferenceError(f"generation ended with requests {unfinished} unfinished", requests=unfinished)
    finally:
        stats.wall_s = time.perf_counter() - t0
        stats.ttft_s = [first_token[r] for r in sorted(first_token)]
