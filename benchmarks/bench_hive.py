"""hive runtime benchmark: Coordinator throughput vs raw Ray, scheduling overhead, SIGKILL
recovery, and EventLog append rates, all measured side by side in one run.

Sections (each one dict in ``results``, with its ``config``):

1. ``throughput``: N pipelined no-op calls on plain Ray actors (``@ray.remote(max_concurrency=4)``,
   as many as hive agents) vs ``submit_many("noop", range(N))`` + ``gather`` on hive EchoAgents;
   medians of 3 interleaved reps after a warm-up rep of each. Goal: hive/raw >= 0.5.
   ``single_submit``: sequential ``submit(...).result()`` vs sequential ``ray.get(actor.noop.remote())``
   (informational).
2. ``scheduling``: the Coordinator's own admission -> dispatch latency of those sequential
   submits (idle agents: pure overhead). Goals: p50 <= 1 ms, p99 <= 5 ms.
3. ``sigkill_recovery``: SIGKILL the agent running a ``sleep(0.3)`` task; time from the kill
   until ``result()`` returns. Goals: max <= 10 s, no task lost.
4. ``eventlog``: append rate with durability "full" and "normal", one event per transaction
   and group commits of 100 (informational).

Usage::

    python benchmarks/bench_hive.py --quick              # ~1-2 minutes on 2 cores
    python benchmarks/bench_hive.py --quick --trials 20
    python benchmarks/bench_hive.py                      # full: N=10000, 100 kill trials

The machine may be shared: quote medians and ratios, not absolute times. The exit code is 0
even when a goal is missed (the goals table says MISSED); it is 1 only if a section crashed.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
from _common import (
    base_parser,
    dig,
    fs_type,
    goal,
    host_info,
    median,
    print_goals,
    print_results,
    summarize,
    write_json,
)

import hive
from hive import _events as hev
from hive._eventlog import EventLog
from hive.testing import EchoAgent, SlowAgent

BENCHMARK = "hive"
LIVE = ("ready", "busy")


# num_cpus=0 like the hive agents (EchoAgent declares no resources, so it reserves no CPU)
@ray.remote(num_cpus=0, max_concurrency=4)  # type: ignore[call-overload]
class RawNoop:
    """The raw-Ray baseline: a plain threaded actor with a no-op method."""

    def noop(self, payload: Any = None) -> None:
        return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1 + 2: throughput, single-submit latency, scheduling overhead ----------------------

def _raw_rep(actors: list[Any], n: int) -> float:
    t0 = time.perf_counter()
    refs = [actors[i % len(actors)].noop.remote(i) for i in range(n)]
    ray.get(refs)
    return time.perf_counter() - t0


def _hive_rep(client: hive.Client, n: int) -> float:
    t0 = time.perf_counter()
    handles = client.submit_many("noop", range(n))
    values = client.gather(handles, timeout=600)
    dt = time.perf_counter() - t0
    if len(values) != n or any(v is not None for v in values):
        raise RuntimeError(f"hive noop returned unexpected values (n={len(values)})")
    return dt


def bench_throughput(client: hive.Client, actors: list[Any], agents: int, n: int, reps: int) -> dict[str, Any]:
    log(f"throughput: warm-up ({n} calls each)")
    _raw_rep(actors, n)
    _hive_rep(client, n)
    ray.get(client.coordinator.scheduling_latencies.remote(reset=True))
    raw_s, hive_s = [], []
    for r in range(reps):  # interleaved, so drift from other load hits both sides alike
        raw_s.append(_raw_rep(actors, n))
        hive_s.append(_hive_rep(client, n))
        log(f"throughput rep {r + 1}/{reps}: raw {n / raw_s[-1]:,.0f}/s, hive {n / hive_s[-1]:,.0f}/s")
    under_load = ray.get(client.coordinator.scheduling_latencies.remote(reset=True))
    raw_rates = [n / s for s in raw_s]
    hive_rates = [n / s for s in hive_s]
    raw_med, hive_med = statistics.median(raw_rates), statistics.median(hive_rates)
    return {
        "section": "throughput",
        "config": {"n": n, "reps": reps, "warmup_reps": 1, "agents": agents, "raw_actors": len(actors),
                   "agent_class": "hive.testing.EchoAgent", "max_concurrency": 4, "task": "noop",
                   "interleaved": True},
        "raw_calls_per_s": round(raw_med, 1),
        "hive_tasks_per_s": round(hive_med, 1),
        "hive_vs_raw": round(hive_med / raw_med, 4),
        "hive_vs_raw_per_rep_median": round(statistics.median(h / r for h, r in zip(hive_rates, raw_rates)), 4),
        "raw_reps_per_s": [round(x, 1) for x in raw_rates],
        "hive_reps_per_s": [round(x, 1) for x in hive_rates],
        # admission -> dispatch under a deep queue: includes waiting for a free agent slot
        "sched_under_load_ms": summarize(under_load, 1000),
    }


def bench_single(client: hive.Client, actors: list[Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    log(f"single submit: {n} sequential calls each (interleaved)")
    for i in range(10):  # warm the paths
        client.submit("noop", i).result(timeout=60)
        ray.get(actors[i % len(actors)].noop.remote(i))
    ray.get(client.coordinator.scheduling_latencies.remote(reset=True))
    hive_lat, raw_lat = [], []
    for i in range(n):
        t0 = time.perf_counter()
        ray.get(actors[i % len(actors)].noop.remote(i))
        t1 = time.perf_counter()
        client.submit("noop", i).result(timeout=60)
        t2 = time.perf_counter()
        raw_lat.append(t1 - t0)
        hive_lat.append(t2 - t1)
    sched = ray.get(client.coordinator.scheduling_latencies.remote(reset=True))
    hive_sum, raw_sum = summarize(hive_lat, 1000), summarize(raw_lat, 1000)
    single = {
        "section": "single_submit",
        "config": {"n": n, "hive": "sequential submit(...).result()", "raw": "sequential ray.get(actor.noop.remote())",
                   "interleaved": True},
        "hive_ms": hive_sum, "raw_ms": raw_sum,
        "p50_hive_vs_raw": round(hive_sum["p50"] / raw_sum["p50"], 3) if raw_sum["p50"] else None,
    }
    sched_sum = summarize(sched, 1000)
    scheduling = {
        "section": "scheduling",
        "config": {"source": "Coordinator.scheduling_latencies(reset=True) after the sequential single submits",
                   "what": "durable admission -> dispatch of each first attempt, idle agents", "n_submits": n},
        "sched_ms": sched_sum,
        "samples": len(sched),
    }
    return single, scheduling


# ---- 3: SIGKILL recovery -------------------------------------------------------------------

def _slow_pool(client: hive.Client) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(usable SlowAgents, all SlowAgents); usable = not terminal for good."""
    slow = [a for a in client.agents() if a["kind"] == SlowAgent.kind]
    max_restarts = SlowAgent.respawn.max_restarts
    usable = [a for a in slow if a["state"] != "terminated"
              and not (a["state"] == "failed" and a["restarts"] >= max_restarts)]
    return usable, slow


def _wait_pool(client: hive.Client, size: int, timeout: float = 120.0) -> tuple[float, int]:
    """Wait until ``size`` SlowAgents are ready/busy, spawning replacements for agents whose
    restarts ran out. Returns (seconds waited, agents spawned)."""
    t0 = time.perf_counter()
    spawned = 0
    while True:
        usable, _ = _slow_pool(client)
        if len(usable) < size:
            client.spawn(SlowAgent, count=size - len(usable))
            spawned += size - len(usable)
            continue
        if all(a["state"] in LIVE and a.get("pid") for a in usable):
            return time.perf_counter() - t0, spawned
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"SlowAgents not ready after {timeout}s: "
                               f"{[(a['agent_id'], a['state']) for a in usable]}")
        time.sleep(0.02)


def bench_sigkill(client: hive.Client, trials: int, pool: int = 2, sleep_s: float = 0.3) -> dict[str, Any]:
    log(f"sigkill: {trials} trials on {pool} SlowAgents")
    client.spawn(SlowAgent, count=pool)
    _wait_pool(client, pool)
    recovery, ready_again, attempts = [], [], []
    lost, not_rerun, skipped, replacements = 0, 0, 0, 0
    errors: list[str] = []
    for trial in range(trials):
        handle = client.submit("sleep", sleep_s)
        deadline = time.perf_counter() + 30
        info = handle.info()
        while not (info["status"] == "running" and info.get("agent_id")):
            if info["status"] in ("completed", "failed", "dead_lettered", "cancelled") or time.perf_counter() > deadline:
                break
            time.sleep(0.002)
            info = handle.info()
        if info["status"] != "running":
            skipped += 1
            errors.append(f"trial {trial}: task never seen running (status {info['status']})")
            handle.result(timeout=60)
            _wait_pool(client, pool)
            continue
        victim = info["agent_id"]
        pid = next((a.get("pid") for a in client.agents() if a["agent_id"] == victim), None)
        if not pid:
            skipped += 1
            errors.append(f"trial {trial}: no pid for agent {victim}")
            handle.result(timeout=60)
            continue
        os.kill(int(pid), signal.SIGKILL)
        t_kill = time.perf_counter()
        try:
            value = handle.result(timeout=60)
            recovery.append(time.perf_counter() - t_kill)
            if value["pid"] == pid or (value["agent_id"] == victim and value["attempt"] <= info["attempt"]):
                not_rerun += 1
                errors.append(f"trial {trial}: result came from the killed attempt: {value}")
            attempts.append(value["attempt"])
        except Exception as exc:  # noqa: BLE001 - a lost task, not a crash of the benchmark
            lost += 1
            errors.append(f"trial {trial}: {type(exc).__name__}: {exc}"[:300])
        _, spawned = _wait_pool(client, pool)
        replacements += spawned
        ready_again.append(time.perf_counter() - t_kill)
        if (trial + 1) % 10 == 0 or trial + 1 == trials:
            log(f"sigkill trial {trial + 1}/{trials}: recovery p50 "
                f"{median(recovery) or float('nan'):.3f}s, lost {lost}")
    _, slow = _slow_pool(client)
    return {
        "section": "sigkill_recovery",
        "config": {"trials": trials, "agents": pool, "agent_class": "hive.testing.SlowAgent", "max_concurrency": 1,
                   "task": f"sleep {sleep_s}", "signal": "SIGKILL",
                   "heartbeat_timeout_s": client.config.heartbeat_timeout_s,
                   "respawn_max_restarts": SlowAgent.respawn.max_restarts,
                   "measured": "SIGKILL of the running agent -> handle.result() returns"},
        "recovery_s": summarize(recovery, 1, 4),
        "ready_again_s": summarize(ready_again, 1, 4),  # kill -> every agent ready again (respawn)
        "lost": lost, "not_rerun": not_rerun, "skipped": skipped, "completed_trials": len(recovery),
        "result_attempts": {str(a): attempts.count(a) for a in sorted(set(attempts))},
        "replacement_agents_spawned": replacements,
        "agent_restarts": sorted(a["restarts"] for a in slow),
        "errors": errors[:20],
    }


# ---- 4: EventLog append rate ----------------------------------------------------------------

def _events(n: int, prefix: str) -> list[Any]:
    return [hev.TaskSubmitted(task_id=f"{prefix}{i}", task_type="noop", idempotency_key=f"{prefix}k{i}",
                              payload=b"\x80\x05N." + bytes(60)) for i in range(n)]


def bench_eventlog(single_n: int, batch_n: int, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"section": "eventlog"}
    with tempfile.TemporaryDirectory(prefix="hive-bench-eventlog-") as tmp:
        out["config"] = {"single_events": single_n, "batch_events": batch_n, "batch_size": batch,
                         "event": "TaskSubmitted (64-byte payload)", "dir_fs": fs_type(tmp),
                         "events_prebuilt": True}
        for durability in ("full", "normal"):
            log(f"eventlog: durability={durability}: {single_n} appends, {batch_n} in batches of {batch}")
            path = Path(tmp) / f"events-{durability}.db"
            singles, batched = _events(single_n, "s"), _events(batch_n, "b")
            with EventLog(path, durability=durability) as elog:
                t0 = time.perf_counter()
                for e in singles:
                    elog.append(e)
                t1 = time.perf_counter()
                for i in range(0, batch_n, batch):
                    elog.append_many(batched[i:i + batch])
                t2 = time.perf_counter()
                stored = elog.count()
            if stored != single_n + batch_n:
                raise RuntimeError(f"event log holds {stored} events, expected {single_n + batch_n}")
            out[durability] = {"append_events_per_s": round(single_n / (t1 - t0), 1),
                               "append_many_events_per_s": round(batch_n / (t2 - t1), 1),
                               "append_ms_per_commit": round(1000 * (t1 - t0) / single_n, 4),
                               "append_many_ms_per_commit": round(1000 * (t2 - t1) / (batch_n / batch), 4)}
        out["full_vs_normal_append"] = round(out["full"]["append_events_per_s"] / out["normal"]["append_events_per_s"], 4)
    return out


# ---- main ------------------------------------------------------------------------------------

def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="SIGKILL trials (default 5 quick, 100 full)")
    parser.add_argument("--n", type=int, default=None, help="tasks per throughput rep (default 2000 quick, 10000 full)")
    parser.add_argument("--single", type=int, default=200, help="sequential single submits (default 200)")
    args = parser.parse_args()
    n = args.n or (2000 if args.quick else 10_000)
    trials = args.trials if args.trials is not None else (5 if args.quick else 100)
    host = host_info()  # its loadavg is the load at start
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    crashed: list[str] = []

    def section(name: str, fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other sections
            traceback.print_exc()
            crashed.append(name)
            results.append({"section": name, "config": {}, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return None

    home = tempfile.mkdtemp(prefix="hive-bench-home-")
    log(f"hive.init(home={home}, num_cpus=4)")
    client = hive.init(home=home, num_cpus=4, max_queue=max(10_000, 2 * n))
    try:
        agent_ids = client.spawn(EchoAgent, count=2)
        actors = [RawNoop.remote() for _ in agent_ids]  # type: ignore[attr-defined]
        ray.get([a.noop.remote() for a in actors])
        thr = section("throughput", bench_throughput, client, actors, len(agent_ids), n, 3)
        if thr:
            results.append(thr)
        pair = section("single_submit", bench_single, client, actors, args.single)
        if pair:
            results.extend(pair)
        # the kill test runs on SlowAgents only: retire the EchoAgents (they also handle "sleep")
        for aid in agent_ids:
            client.terminate(aid)
        for a in actors:
            ray.kill(a)
        kill = section("sigkill_recovery", bench_sigkill, client, trials)
        if kill:
            results.append(kill)
    finally:
        hive.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    ev = section("eventlog", bench_eventlog, 2000, 20_000, 100)
    if ev:
        results.append(ev)

    by = {r["section"]: r for r in results}

    def get(sec: str, *keys: str) -> Any:
        return dig(by, sec, *keys)

    goals = [
        goal("coordinator_vs_raw_throughput", get("throughput", "hive_vs_raw"), ">=", 0.5),
        goal("scheduling_overhead_p50_ms", get("scheduling", "sched_ms", "p50"), "<=", 1.0),
        goal("scheduling_overhead_p99_ms", get("scheduling", "sched_ms", "p99"), "<=", 5.0),
        goal("sigkill_recovery_max_s", get("sigkill_recovery", "recovery_s", "max"), "<=", 10.0),
        goal("sigkill_lost_tasks", get("sigkill_recovery", "lost"), "==", 0),
        goal("sigkill_result_from_new_attempt_violations", get("sigkill_recovery", "not_rerun"), "==", 0),
    ]
    print_results(results, title=f"hive benchmark ({'quick' if args.quick else 'full'}, medians; "
                                 f"machine may be shared)")
    print_goals(goals)
    duration = round(time.perf_counter() - t_start, 1)
    path = write_json(BENCHMARK, args.quick, results, goals, args.out, host=host,
                      argv=sys.argv[1:], duration_s=duration, loadavg_at_end=host_info()["loadavg_1_5_15"],
                      crashed_sections=crashed)
    print(f"wrote {path} ({duration}s)")
    if crashed:
        print(f"sections that crashed: {', '.join(crashed)}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
