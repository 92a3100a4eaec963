"""The evaluator: in-place merges equal the streaming merge; failures are results, not crashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import hive
from evolution._evaluator import (
    EVALUATE,
    EvaluationRequest,
    EvaluationResult,
    Evaluator,
    evaluate_request,
)
from evolution._genome import GenomeLayout
from evolution._inplace import ResidentModel
from evolution._merge import merge
from evolution.tasks import CallableTask, Perplexity
from tests.evolution.helpers import TinySet, load_weights
from tests.evolution.test_merge import METHODS, make_recipe

WIKI = Perplexity("wiki", ["Hello world, this is a text.", "The quick brown fox."])


def _layout(tiny: TinySet, **kw: Any) -> GenomeLayout:
    return GenomeLayout(method="task_arithmetic", base_model=str(tiny.base),
                        models=[str(p) for p in tiny.models[:2]], **kw)  # fmt: skip


def _boom(model: Any, tokenizer: Any) -> float:
    raise RuntimeError("fitness exploded")


@pytest.mark.parametrize("arch", ["llamas", "gpt2s"])
def test_in_place_merge_equals_the_streaming_merge(arch: str, request: pytest.FixtureRequest,
                                                   tmp_path: Path) -> None:  # fmt: skip
    tiny: TinySet = request.getfixturevalue(arch)
    layout = _layout(tiny, per_layer_groups=2, n_layers=4)
    resident = ResidentModel("cpu")
    for genome in ([0.9] * layout.dims, [0.1 + 0.07 * i for i in range(layout.dims)]):
        recipe = layout.to_recipe(genome)
        resident.apply(recipe)
        written = load_weights(Path(merge(recipe, tmp_path / f"m{genome[1]}", progress=False).path))
        live = resident.model.state_dict()
        assert written and all(torch.equal(live[k], v) for k, v in written.items())
    before = resident.load_seconds
    resident.apply(layout.to_recipe([0.5] * layout.dims))
    assert resident.load_seconds == before  # model and inputs stay cached


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_in_place_in_pieces_bit_for_bit(
    llamas: TinySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Pieces of 1000 elements written straight into the parameters (statistics passes,
    uneven last pieces, rounding to float16 in place) give the streaming merge's bits."""
    from evolution import _inplace

    monkeypatch.setattr(_inplace, "_CPU_PIECE", 1000)
    recipe = make_recipe(llamas, method, dtype="float16")
    resident = ResidentModel("cpu")
    resident.apply(recipe)
    written = load_weights(Path(merge(recipe, tmp_path / "out", progress=False).path))
    live = resident.model.state_dict()
    assert written
    for name, tensor in written.items():
        assert live[name].dtype == torch.float32  # the resident model stays float32 ...
        assert torch.equal(live[name], tensor.to(torch.float32)), name  # ... rounded to fp16


def test_a_parameter_the_merge_cannot_write_into_is_merged_then_copied(
    llamas: TinySet, tmp_path: Path
) -> None:
    """A non-contiguous parameter (here a square weight stored transposed) takes the
    merge-then-copy path and still ends with the streaming merge's values."""
    recipe = make_recipe(llamas, "ties")
    resident = ResidentModel("cpu")
    resident.apply(recipe)
    name, param = next((k, p) for k, p in resident.model.named_parameters()
                       if p.dim() == 2 and p.shape[0] == p.shape[1])  # fmt: skip
    param.data = torch.empty_like(param).t().contiguous().t()  # same shape, not contiguous
    assert not param.is_contiguous()
    resident._params[name] = param
    resident.apply(recipe)
    written = load_weights(Path(merge(recipe, tmp_path / "out", progress=False).path))
    assert torch.equal(resident.model.state_dict()[name], written[name])


def test_scores_every_task_and_reports_timings(llamas: TinySet) -> None:
    layout = _layout(llamas)
    request = EvaluationRequest(candidate_id="c1", recipe=layout.to_recipe([0.5, 0.5]),
                                tasks=(WIKI, CallableTask("one", lambda m, t: 1.0)))  # fmt: skip
    result = evaluate_request(request, ResidentModel("cpu"))
    assert result.status == "ok" and set(result.scores) == {"wiki", "one"}
    assert result.scores["wiki"] < 0 and result.scores["one"] == 1.0
    assert set(result.task_seconds) == {"wiki", "one"} and result.load_seconds > 0


def test_non_finite_merge_is_rejected_not_raised(llamas: TinySet) -> None:
    layout = _layout(llamas, bounds={"weight": (0.0, 1e8)}, dtype="float16")
    request = EvaluationRequest(candidate_id="nan", recipe=layout.to_recipe([1e8, 1e8]), tasks=(WIKI,))
    resident = ResidentModel("cpu")
    result = evaluate_request(request, resident)
    assert result.status == "rejected" and result.scores == {}
    assert "NonFiniteError" in (result.error or "") and "NaN/inf" in (result.error or "")
    ok = evaluate_request(request.model_copy(update={"recipe": layout.to_recipe([0.5, 0.5])}), resident)
    assert ok.status == "ok"  # the next candidate rewrites every merged tensor


def test_fitness_callable_raising_fails_the_candidate_with_its_traceback(llamas: TinySet) -> None:
    request = EvaluationRequest(candidate_id="c", recipe=_layout(llamas).to_recipe([0.5, 0.5]),
                                tasks=(WIKI, CallableTask("boom", _boom)))  # fmt: skip
    result = evaluate_request(request, ResidentModel("cpu"))
    assert result.status == "failed" and result.error == "RuntimeError: fitness exploded"
    assert "_boom" in (result.traceback or "") and "Traceback" in (result.traceback or "")


def test_evaluator_agent_serves_requests(ray_local: Any, hive_home: Path, llamas: TinySet) -> None:
    client = hive.init(home=hive_home)
    try:
        [agent] = client.spawn(Evaluator, 1)
        layout = _layout(llamas)
        requests = [EvaluationRequest(candidate_id=f"c{i}", recipe=layout.to_recipe([w, 1 - w]),
                                      tasks=(WIKI,)) for i, w in enumerate((0.2, 0.8))]  # fmt: skip
        results = client.gather(client.submit_many(EVALUATE, requests), timeout=120)
        assert all(isinstance(r, EvaluationResult) and r.status == "ok" for r in results)
        assert {r.agent_id for r in results} == {agent}
        assert results[0].scores != results[1].scores
        assert results[0].load_seconds > 0 and results[1].load_seconds == 0  # resident model
    finally:
        hive.shutdown(stop_cluster=True)
