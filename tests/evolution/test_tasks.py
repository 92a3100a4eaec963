"""Fitness tasks: scores, the "higher is better" convention, pickling, registry."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import cloudpickle
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evolution import UnknownNameError
from evolution.tasks import (
    CallableTask,
    ExactMatch,
    FitnessTask,
    Perplexity,
    get_task,
    known_tasks,
    task_from_spec,
)
from tests.evolution.helpers import TinySet


@pytest.fixture(scope="module")
def model_and_tokenizer(llamas: TinySet) -> tuple[object, object]:
    model = AutoModelForCausalLM.from_pretrained(llamas.base, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(llamas.base)


def test_perplexity_is_minus_mean_token_nll(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    texts = ["Hello world.", "abc"]
    score = Perplexity("wiki", texts, max_length=64).score(model, tok)
    nll, n = 0.0, 0
    for text in texts:  # reference: HF's own mean loss, re-weighted by token count
        ids = torch.tensor([[ord(c) for c in text]])  # the tiny tokenizer: ids = ASCII codes
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert score == pytest.approx(-nll / n, rel=1e-5)
    assert score < 0 and math.exp(-score) > 1.0  # exp(-score) is the perplexity


def test_perplexity_truncates_and_refuses_empty(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    long = Perplexity("w", ["x" * 50 + "y" * 50], max_length=50).score(model, tok)
    assert long == pytest.approx(Perplexity("w", ["x" * 50]).score(model, tok))
    with pytest.raises(ValueError, match="2 or more tokens"):
        Perplexity("w", ["x"]).score(model, tok)


def test_exact_match_compares_the_stripped_greedy_answer(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    ids = torch.tensor([[ord(c) for c in "2+2="]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=3)
    greedy = tok.decode(out[0, 4:], skip_special_tokens=True).split("\n", 1)[0]
    assert greedy.strip(), "the tiny model produced only whitespace; pick another prompt"
    task = ExactMatch("math", [("2+2=", f"  {greedy.strip()} "), ("2+2=", "definitely not")],
                      max_new_tokens=3)  # fmt: skip
    assert task.score(model, tok) == 0.5


def test_callable_task_scores_and_reports_bad_returns(model_and_tokenizer: tuple) -> None:
    model, tok = model_and_tokenizer
    assert CallableTask("n", lambda m, t: 2).score(model, tok) == 2.0
    with pytest.raises(TypeError, match="must return a float"):
        CallableTask("n", lambda m, t: "high").score(model, tok)


def test_tasks_pickle_and_round_trip_through_json() -> None:
    tasks = [Perplexity("w", ["hi there"]), ExactMatch("m", [("q", "a")]),
             CallableTask("c", lambda m, t: 41.0 + 1)]  # fmt: skip
    for task in tasks:
        again = cloudpickle.loads(cloudpickle.dumps(task))
        assert again.domain == task.domain and type(again) is type(task)
        from_json = task_from_spec(task.model_dump(mode="json"))
        assert type(from_json) is type(task)
    assert task_from_spec(tasks[2].model_dump(mode="json")).fn(None, None) == 42.0
    assert pickle.loads(pickle.dumps(tasks[0])) == tasks[0]


def test_registry_lists_known_names() -> None:
    assert known_tasks() == ["callable", "exact_match", "perplexity"]
    assert get_task("perplexity") is Perplexity and issubclass(Perplexity, FitnessTask)
    with pytest.raises(UnknownNameError, match="callable, exact_match, perplexity"):
        task_from_spec({"task": "bleu", "domain": "x"})
    with pytest.raises(ValueError, match="`task` of a Perplexity"):
        Perplexity("w", ["hi"], task="exact_match")


def test_callable_task_of_a_module_function_pickles_by_reference(tmp_path: Path) -> None:
    task = CallableTask("len", len_of_vocab)
    assert b"len_of_vocab" in cloudpickle.dumps(task)


def len_of_vocab(model: object, tokenizer: object) -> float:
    return float(len(tokenizer))  # type: ignore[arg-type]
