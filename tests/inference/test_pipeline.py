"""The pipeline scheduler and transports in-process (no Ray): equality, overlap, replay, sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import inference
from inference._transport import LocalTransport, StageLostError, ThreadedTransport
from tests.inference.helpers import hf_greedy, reference

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19]]


def _expected(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = reference(path)
    return [hf_greedy(model, torch.tensor([p]), n)[0, len(p):].tolist() for p in prompts]


def _stages(path: Path, cuts: list[int]) -> list[inference.StageCompute]:
    return [inference.StageCompute(path, a, b) for a, b in zip(cuts, cuts[1:])]


def _run(transport: Any, prompts: list[list[int]], n: int, **kw: Any) -> list[list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for ev in inference.run_generation(transport, prompts, max_new_tokens=n, **kw):
        out[ev.request].append(ev.token_id)
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("microbatches", [1, 2, 5])
def test_local_and_threaded_equal_hf(tiny_llama: Path, microbatches: int) -> None:
    expected = _expected(tiny_llama, PROMPTS, 12)
    local = _run(LocalTransport(_stages(tiny_llama, [0, 2, 4])), PROMPTS, 12, microbatches=microbatches)
    threaded = ThreadedTransport(_stages(tiny_llama, [0, 1, 3, 4]))
    try:
        assert _run(threaded, PROMPTS, 12, microbatches=microbatches) == expected == local
        assert threaded.stage_times().calls[0] == 12 * microbatches
    finally:
        threaded.close()


def test_gpt2_pipeline(tiny_gpt2: Path) -> None:
    expected = _expected(tiny_gpt2, PROMPTS[:3], 10)
    assert _run(LocalTransport(_stages(tiny_gpt2, [0, 3, 4])), PROMPTS[:3], 10, microbatches=2) == expected


class _Flaky(LocalTransport):
    """Loses one step (as if a stage died) after ``fail_after`` submits; recovery is immediate."""

    def __init__(self, stages: list[Any], fail_after: int) -> None:
        super().__init__(stages)
        self.submits, self.fail_after, self.recovered = 0, fail_after, 0

    def submit(self, step: Any) -> Any:
        self.submits += 1
        if self.submits == self.fail_after:
            self.stages[1].drop_slot(step.slot)  # the "dead" stage lost its cache too
            return "lost"
        return super().submit(step)

    def wait(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        return ["lost"] if "lost" in handles else super().wait(handles)

    def fetch(self, handle: Any) -> torch.Tensor:
        if handle == "lost":
            raise StageLostError("stage 1 died", stage=1)
        return super().fetch(handle)

    def recover(self) -> None:
        self.recovered += 1


def test_replay_after_stage_loss_gives_identical_output(tiny_llama: Path) -> None:
    expected = _run(LocalTransport(_stages(tiny_llama, [0, 2, 4])), PROMPTS, 16, microbatches=2)
    flaky = _Flaky(_stages(tiny_llama, [0, 2, 4]), fail_after=9)
    stats = inference.GenerationStats()
    assert _run(flaky, PROMPTS, 16, microbatches=2, stats=stats) == expected
    assert flaky.recovered == 1 and len(stats.recoveries) == 1


def test_sampling_params_and_sampler() -> None:
    with pytest.raises(inference.InferenceError, match="top_p"):
        inference.SamplingParams(temperature=1.0, top_p=0.0)
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert inference.sample_next(logits, inference.SamplingParams(), [None]).tolist() == [1]
    p = inference.SamplingParams(temperature=1.0, top_k=2)
    picks = {int(inference.sample_next(logits, p, [torch.Generator().manual_seed(s)])) for s in range(50)}
    assert picks == {1, 2}  # top-k keeps exactly the two best
    p = inference.SamplingParams(temperature=1.0, top_p=0.4)
    picks = {int(inference.sample_next(logits, p, [torch.Generator().manual_seed(s)])) for s in range(50)}
    assert picks == {1}  # the nucleus is the single token holding > 40%


def test_bad_generation_arguments(tiny_llama: Path) -> None:
    t = LocalTransport(_stages(tiny_llama, [0, 4]))
    with pytest.raises(inference.InferenceError, match="at least one token"):
        list(inference.run_generation(t, [[]], max_new_tokens=3))


def test_pick_tokens_is_counter_based_and_checks_rows() -> None:
    logits = torch.randn(3, 1, 50, generator=torch.Generator().manual_seed(0))
    params = inference.SamplingParams(temperature=1.0, top_k=20)
    spec = inference.SampleSpec(params, (5, 6, None), (0, 4, 2))
    a, b = inference.pick_tokens(logits, spec), inference.pick_tokens(logits, spec)
    assert a[:2].tolist() == b[:2].tolist()  # seeded rows: the same draw every time, anywhere
    # row 1 alone, as the first row of another micro-batch: the same token (grouping-independent)
    alone = inference.pick_tokens(logits[1:2], inference.SampleSpec(params, (6,), (4,)))
    assert alone.tolist() == a[1:2].tolist()
    # a different token index draws from a different generator
    draws = {int(inference.pick_tokens(logits[:1], inference.SampleSpec(params, (5,), (n,)))) for n in range(40)}
    assert len(draws) > 1
    greedy = inference.SampleSpec(inference.SamplingParams(), (None, None, None), (0, 0, 0))
    assert inference.pick_tokens(logits, greedy).tolist() == logits[:, -1].argmax(-1).tolist()
    with pytest.raises(inference.InferenceError, match="sample spec for 2 rows"):
        inference.pick_tokens(logits, inference.SampleSpec(params, (1, 2), (0, 0)))
