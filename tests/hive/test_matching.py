"""Matching tasks to agents: eligibility filters, reputation-weighted balancing, unmet reasons."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import pytest

from hive._exceptions import ConfigError
from hive._matching import AgentView, TaskDemand, choose_agent, unmet_reason
from hive._reputation import ReputationBook, ReputationPolicy

ECHO = TaskDemand("echo", {"CPU": 1})


def view(agent_id: str, caps: Iterable[str] = ("echo",),
         resources: Mapping[str, float] | None = None, state: str = "ready",
         outstanding: int = 0, max_concurrency: int = 4, kind: str = "Echo") -> AgentView:
    return AgentView(agent_id=agent_id, kind=kind, capabilities=frozenset(caps),
                     resources={"CPU": 1} if resources is None else resources, state=state,
                     outstanding=outstanding, max_concurrency=max_concurrency)


class FixedBook(ReputationBook):
    """A book whose scores are set directly (unknown agents: 0.7)."""

    def __init__(self, scores: dict[str, float]) -> None:
        super().__init__()
        self.scores = scores

    def score(self, agent_id: str, now: float | None = None) -> float:
        return self.scores.get(agent_id, 0.7)


def test_only_agents_declaring_the_task_type_are_chosen() -> None:
    agents = [view("a", caps=("train",)), view("b", caps=("echo", "train"))]
    assert choose_agent(ECHO, agents, ReputationBook(), now=0.0) == "b"
    assert choose_agent(TaskDemand("infer"), agents, ReputationBook(), now=0.0) is None


def test_resources_must_cover_the_demand_and_undeclared_counts_as_zero() -> None:
    cpu = view("cpu", resources={"CPU": 8})
    gpu = view("gpu", resources={"CPU": 1, "GPU": 1})
    book = ReputationBook()
    assert choose_agent(TaskDemand("echo", {"GPU": 1}), [cpu, gpu], book, now=0.0) == "gpu"
    assert choose_agent(TaskDemand("echo", {"GPU": 2}), [cpu, gpu], book, now=0.0) is None
    assert choose_agent(TaskDemand("echo", {"CPU": 4}), [cpu, gpu], book, now=0.0) == "cpu"
    assert choose_agent(TaskDemand("echo", {"CPU": 4, "GPU": 1}), [cpu, gpu], book,
                        now=0.0) is None  # no single agent has both
    assert choose_agent(TaskDemand("echo", {"TPU": 0}), [cpu], book, now=0.0) == "cpu"


def test_an_agent_at_max_concurrency_is_skipped() -> None:
    full = view("full", outstanding=2, max_concurrency=2)
    book = FixedBook({"full": 1.0, "slow": 0.06})
    assert choose_agent(ECHO, [full], book, now=0.0) is None
    assert choose_agent(ECHO, [full, view("slow", outstanding=3)], book, now=0.0) == "slow"


@pytest.mark.parametrize(("state", "eligible"), [
    ("ready", True), ("busy", True), ("spawning", False), ("suspended", False),
    ("terminated", False), ("failed", False),
])
def test_only_ready_and_busy_agents_take_tasks(state: str, eligible: bool) -> None:
    chosen = choose_agent(ECHO, [view("a", state=state)], ReputationBook(), now=0.0)
    assert chosen == ("a" if eligible else None)


def test_excluded_agents_are_skipped() -> None:
    agents = [view("a"), view("b", outstanding=3)]
    assert choose_agent(ECHO, agents, ReputationBook(), now=0.0) == "a"
    assert choose_agent(ECHO, agents, ReputationBook(), now=0.0, exclude={"a"}) == "b"
    assert choose_agent(ECHO, agents, ReputationBook(), now=0.0, exclude=["a", "b"]) is None


def test_critical_tasks_go_only_to_trusted_agents() -> None:
    book = ReputationBook()
    book.record_outcome("shaky", "echo", ok=False, latency_s=1.0, now=0.0)  # 0.467: STANDARD
    agents = [view("shaky"), view("solid", outstanding=3)]  # solid: unknown, prior 0.7 = TRUSTED
    critical = TaskDemand("echo", {"CPU": 1}, critical=True)
    assert choose_agent(ECHO, agents, book, now=0.0) == "shaky"  # less loaded
    assert choose_agent(critical, agents, book, now=0.0) == "solid"
    assert choose_agent(critical, agents[:1], book, now=0.0) is None
    # the gate reads reputation at `now`: fresh successes make it trusted (0.733)
    for _ in range(3):
        book.record_outcome("shaky", "echo", ok=True, latency_s=1.0, now=1.0)
    assert choose_agent(critical, agents, book, now=1.0) == "shaky"


def test_balancing_prefers_the_less_loaded_agent() -> None:
    agents = [view("a", outstanding=2), view("b", outstanding=1), view("c", outstanding=3)]
    assert choose_agent(ECHO, agents, ReputationBook(), now=0.0) == "b"


def test_at_equal_load_the_higher_reputation_agent_wins() -> None:
    book = ReputationBook()
    book.record_outcome("a-low", "echo", ok=False, latency_s=1.0, now=0.0)
    book.record_outcome("z-high", "echo", ok=True, latency_s=1.0, now=0.0)
    agents = [view("a-low", outstanding=1), view("z-high", outstanding=1)]
    assert choose_agent(ECHO, agents, book, now=0.0) == "z-high"


def test_reputation_weighs_outstanding_work() -> None:
    book = FixedBook({"good": 0.95, "poor": 0.1})
    # good: (1 + 1) / 0.95 = 2.1 < poor: (0 + 1) / 0.1 = 10, despite more work in flight
    agents = [view("poor", outstanding=0), view("good", outstanding=1)]
    assert choose_agent(ECHO, agents, book, now=0.0) == "good"
    # good: (4 + 1) / 0.95 = 5.3 < 10; (10 + 1) / 0.95 = 11.6 > 10
    agents[1] = view("good", outstanding=4, max_concurrency=8)
    assert choose_agent(ECHO, agents, book, now=0.0) == "good"
    assert choose_agent(ECHO, [agents[0], view("good", outstanding=10, max_concurrency=20)], book,
                        now=0.0) == "poor"


def test_a_zero_score_is_floored_not_divided_by() -> None:
    book = ReputationBook(ReputationPolicy(prior=0.0, cross_check_threshold=0.0))
    assert choose_agent(ECHO, [view("zero")], book, now=0.0) == "zero"
    # load 1 / 0.05 = 20 vs (19 + 1) / 1.0 = 20: tie on load, fewer outstanding wins
    mixed = FixedBook({"zero": 0.0, "busy": 1.0})
    agents = [view("busy", outstanding=19, max_concurrency=32), view("zero")]
    assert choose_agent(ECHO, agents, mixed, now=0.0) == "zero"


def test_ties_break_on_outstanding_then_agent_id_whatever_the_order() -> None:
    # equal load: 1 / 0.4 == 2 / 0.8; the one with fewer tasks in flight wins
    book = FixedBook({"a": 0.8, "b": 0.4})
    assert choose_agent(ECHO, [view("a", outstanding=1), view("b")], book, now=0.0) == "b"
    agents = [view(name, outstanding=1) for name in "dcebfa"]
    rng = random.Random(0)
    for _ in range(10):
        rng.shuffle(agents)
        assert choose_agent(ECHO, agents, ReputationBook(), now=0.0) == "a"


def test_task_demand_rejects_negative_resources() -> None:
    with pytest.raises(ConfigError, match="GPU") as info:
        TaskDemand("echo", {"GPU": -1})
    assert info.value.setting == "resources"  # type: ignore[attr-defined]
    assert TaskDemand("echo").resources == {} and not TaskDemand("echo").critical


@pytest.mark.parametrize("agent", [
    view("a", state="busy", outstanding=4, max_concurrency=4),
    view("a", state="suspended"),
    view("a", state="spawning"),
])
def test_unmet_reason_ignores_what_may_change(agent: AgentView) -> None:
    assert unmet_reason(ECHO, [agent], ReputationBook(), now=0.0) is None


def test_unmet_reason_ignores_reputation_for_critical_tasks() -> None:
    book = ReputationBook()
    for _ in range(5):
        book.record_disagreement("a", now=0.0)
    critical = TaskDemand("echo", {"CPU": 1}, critical=True)
    assert choose_agent(critical, [view("a")], book, now=0.0) is None
    assert unmet_reason(critical, [view("a")], book, now=0.0) is None


def test_unmet_reason_names_an_unknown_task_type_and_the_known_ones() -> None:
    agents = [view("a", caps=("train", "echo")), view("b", caps=("infer",))]
    reason = unmet_reason(TaskDemand("x"), agents, ReputationBook())
    assert reason is not None
    assert reason.startswith("no agent declares task type 'x' (known: echo, infer, train)")
    assert unmet_reason(TaskDemand("x"), [], ReputationBook()) is not None
    assert "(known: none)" in str(unmet_reason(TaskDemand("x"), [], ReputationBook()))


def test_unmet_reason_does_not_count_terminated_or_failed_agents() -> None:
    agents = [view("a", state="terminated"), view("b", state="failed", caps=("echo", "train"))]
    reason = unmet_reason(ECHO, agents, ReputationBook())
    assert reason is not None
    assert "no agent declares task type 'echo' (known: none)" in reason
    assert "2 agent(s) that declared it are terminated or failed" in reason


def test_unmet_reason_names_missing_resources_and_the_largest_offer() -> None:
    agents = [view("small", resources={"GPU": 1}), view("tiny", resources={"CPU": 4}),
              view("other", caps=("train",), resources={"GPU": 8})]
    reason = unmet_reason(TaskDemand("echo", {"GPU": 2}), agents, ReputationBook())
    assert reason is not None
    assert reason.startswith("no agent with task type 'echo' has resources {'GPU': 2}; "
                             "largest offer: {'GPU': 1} (agent small)")
    assert "lower the task's resources" in reason
    # several resources: the single agent that covers most of the demand is shown
    reason = unmet_reason(TaskDemand("echo", {"GPU": 1, "CPU": 4}),
                          [view("g", resources={"GPU": 1, "CPU": 1}),
                           view("c", resources={"CPU": 4})], ReputationBook())
    assert reason is not None and "largest offer: {'GPU': 1, 'CPU': 1} (agent g)" in reason
    # coverage is relative to the demand: 7 of 8 CPUs beats 1 of 2 GPUs and 1 of 8 CPUs
    reason = unmet_reason(TaskDemand("echo", {"GPU": 2, "CPU": 8}),
                          [view("g", resources={"GPU": 1, "CPU": 1}),
                           view("c", resources={"CPU": 7})], ReputationBook())
    assert reason is not None and "largest offer: {'GPU': 0, 'CPU': 7} (agent c)" in reason


def test_unmet_reason_names_agents_that_take_no_tasks_at_all() -> None:
    reason = unmet_reason(ECHO, [view("a", max_concurrency=0)], ReputationBook())
    assert reason is not None and "max_concurrency" in reason and "(a)" in reason
    assert unmet_reason(ECHO, [view("a", max_concurrency=0), view("b")], ReputationBook()) is None
