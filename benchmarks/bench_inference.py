"""Sharded inference benchmark: hive's Ray pipeline vs the unsharded HF model, a sequential
(accelerate-style) pipeline and raw Ray calls, plus stage-kill recovery, all in one run.

Sections (each one dict in ``results``, with its ``config``):

1. ``unsharded``: transformers ``model.generate`` (greedy, ``eos_token_id=[]`` so every request
   runs the full length, left-padded batch) with 1 torch thread: batch 1 and batch 8 tokens/s,
   time to first token (``max_new_tokens=1``); batch 8 with 2 threads (informational: the whole
   2-core machine for one process).
2. ``sequential``: the same stages as hive's p=2 plan, in this process, run one after another
   (``LocalTransport``; what accelerate's ``device_map`` does), m=1 batch 8 and batch 1; m=8
   (informational: the same micro-batching as the hive headline, without overlap).
   ``threaded``: ``ThreadedTransport`` p=2, m=8 (informational: in-process pipelining).
3. ``hive``: ``inference.deploy`` on Ray for p in {1,2,4} and m in {1,2,4,8}: tokens/s for the
   batch of 8 (driver wall: call to last streamed token), batch-1 tokens/s (m=1), mean TTFT as
   the driver sees it, measured bubble ``1 - sum(stage busy_s) / (p * wall)`` (wall = the
   ShardingCoordinator's first submit to last token) beside the GPipe figure (p-1)/(m+p-1),
   and for m=1 the per-hop overhead (method below). m=2 is an extra point: it keeps both stages
   of p=2 busy with 4-row micro-batches.
   ``raw_ray``: the no-compute baselines: a [8, 1, H] tensor through a chain of p plain Ray
   actors whose method returns its input (driver -> a1 -> ... -> ap -> driver), and the cost of
   one item of a Ray streaming generator (how the coordinator streams each token back).
4. ``memory``: per-stage parameter bytes, RSS and peak RSS (VmHWM of the stage process, read from
   /proc) vs the full model's parameter bytes and the peak RSS of a fresh process that loads the
   unsharded model and generates; also the RSS of a process that only imports the libraries.
5. ``recovery``: p=2, 8 prompts; after ~1/4 of the tokens, SIGKILL the stage-1 actor, finish the
   generation, compare with the same generation without the kill; recovery seconds are the
   scheduler's (``info()["last_stats"]["recoveries"]``: stage loss noticed -> steps resubmitted)
   and, beside them, what the caller sees (kill -> next streamed token).

Per-hop overhead (m=1, batch 8): steps are serial, so ``wall/steps - sum(busy_s)/steps`` is the
time per step spent outside the stages' forward (Ray calls, (de)serialization, sampling, token
streaming); divided by p (one actor call per stage) it is the per-hop figure the goal uses. The
least-squares slope of that per-step overhead over p (the marginal cost of one more stage), the
raw Ray chain, and ``(per-step overhead at batch 8 - at batch 1) / 7`` (what each streamed token
adds to a step: the scheduler yields a step's tokens before it submits the next step) are
reported beside it.

Every pipeline uses one torch thread per stage (``threads_per_stage=1``; this driver calls
``torch.set_num_threads(1)`` for the in-process baselines). Cases are run interleaved (one
warm-up of each, then ``--reps`` rounds over all cases); figures are medians over the rounds.

Usage::

    python benchmarks/bench_inference.py --quick            # ~2-3 minutes on 2 cores
    python benchmarks/bench_inference.py                    # full: hidden 768, 32 tokens, 3 reps, ~8 min
    python benchmarks/bench_inference.py --model smollm2    # the real SmolLM2-135M-Instruct

The machine may be shared: quote medians and ratios, not absolute times. The exit code is 0
even when a goal is missed (the goals table says MISSED); it is 1 only if a section crashed.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
import torch
from _common import (
    base_parser,
    dig,
    fmt,
    goal,
    host_info,
    median,
    print_goals,
    print_table,
    proc_memory,
    write_json,
)

import hive
import inference

BENCHMARK = "inference"
PAD_ID = 0  # what InferenceSession.generate pads with when no tokenizer is involved
# the random-weights Llama-family models (seeded: two runs build identical checkpoints)
MODEL_SIZES: dict[str, dict[str, int]] = {
    "quick": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 8192},
    "full": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 8192},
}
TEXT_PROMPTS = [  # for --model smollm2 (tokenized, clipped to 16..32 tokens)
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
    "Write a short poem about the sea at night, with the moon on the water and a lighthouse far away.",
    "Explain in simple terms how a refrigerator keeps food cold, step by step, for a child of ten.",
    "List three reasons why regular exercise is good for your health and describe each one briefly.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker",
    "What is the difference between weather and climate? Give an example of each in everyday life.",
    "Translate the following sentence into French: The library opens at nine in the morning.",
    "Describe the water cycle, starting with evaporation from the oceans and ending with rain.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- model and prompts ---------------------------------------------------------------------

def make_random_model(path: Path, size: dict[str, int], seed: int) -> Path:
    """A seeded random-weights LlamaForCausalLM saved with ``save_pretrained`` (no tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kwargs: dict[str, Any] = dict(size)
    config = LlamaConfig(**kwargs, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


def make_prompts(ckpt: Path, n: int, seed: int, real: bool, lo: int = 16, hi: int = 32) -> list[list[int]]:
    """``n`` prompts of lo..hi tokens: random ids (random model) or tokenized text (real model)."""
    rng = random.Random(seed)
    if real:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt)
        out = []
        for i in range(n):
            ids = list(tok(TEXT_PROMPTS[i % len(TEXT_PROMPTS)])["input_ids"])
            while len(ids) < lo:
                ids = ids + ids
            out.append(ids[: rng.randint(lo, min(hi, len(ids)))])
        return out
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, W]`` ids and mask, left-padded with PAD_ID (as HF generate expects)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def hf_generate(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy ``model.generate`` that never stops early; the generated ids per prompt."""
    ids, mask = left_pad(prompts)
    cfg = copy.deepcopy(model.generation_config)
    cfg.do_sample, cfg.max_new_tokens, cfg.min_new_tokens = False, max_new_tokens, None
    cfg.eos_token_id, cfg.pad_token_id = [], PAD_ID  # [] = never stop (None would mean "the default")
    cfg.temperature = cfg.top_p = cfg.top_k = None  # greedy; silences sampling-flag warnings
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
    return [row[ids.shape[1]:].tolist() for row in out]


# ---- memory of separate processes ------------------------------------------------------------

_CHILD_STATUS = """
def _mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[{"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}[k]] = int(v.split()[0]) * 1024
    return out
"""

_CHILD_UNSHARDED = _CHILD_STATUS + """
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
ckpt, prompts, n_new, pad = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
params = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
width = max(len(p) for p in prompts)
ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
cfg = model.generation_config
cfg.do_sample, cfg.max_new_tokens, cfg.eos_token_id, cfg.pad_token_id = False, n_new, [], pad
cfg.temperature = cfg.top_p = cfg.top_k = None
with torch.inference_mode():
    model.generate(ids, attention_mask=mask, generation_config=cfg)
print(json.dumps({"param_bytes": params, **_mem()}))
"""

_CHILD_IMPORTS = _CHILD_STATUS + """
import json, torch, transformers, ray, hive, inference
from transformers import AutoModelForCausalLM
from inference._stage import StageCompute
print(json.dumps(_mem()))
"""


def _child(code: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"child process failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- one measured run of a case ---------------------------------------------------------------

@dataclass
class Sample:
    """One run of a case."""

    wall_s: float  # driver: call -> last token
    tokens: int  # generated tokens
    outputs: list[list[int]]  # generated ids per request
    ttft_s: list[float] = field(default_factory=list)  # driver: call -> each request's first token
    busy_s: list[float] | None = None  # per stage, this run only
    steps: int | None = None  # pipeline steps submitted
    sched_wall_s: float | None = None  # scheduler's own wall (first submit -> last token)
    sched_ttft_s: list[float] = field(default_factory=list)  # scheduler's TTFT per request


@dataclass
class Case:
    """Something to measure: ``run(max_new_tokens)`` returns a Sample."""

    key: str  # unique, e.g. "hive:p2:m8:b8"
    section: str  # unsharded | sequential | threaded | hive
    config: dict[str, Any]
    run: Callable[[int], Sample]
    samples: list[Sample] = field(default_factory=list)


def _inproc_case(key: str, section: str, transport: Any, prompts: list[list[int]], m: int,
                 config: dict[str, Any]) -> Case:
    tags = itertools.count()

    def run(n_new: int) -> Sample:
        before = list(transport.stage_times().busy)
        stats = inference.GenerationStats()
        out: list[list[int]] = [[] for _ in prompts]
        first: dict[int, float] = {}
        t0 = time.perf_counter()
        for ev in inference.run_generation(transport, prompts, max_new_tokens=n_new, microbatches=m,
                                           stats=stats, pad_id=PAD_ID, tag=f"{key}-{next(tags)}"):
            first.setdefault(ev.request, time.perf_counter() - t0)
            out[ev.request].append(ev.token_id)
        wall = time.perf_counter() - t0
        busy = [a - b for a, b in zip(transport.stage_times().busy, before)]
        return Sample(wall, stats.tokens, out, [first[r] for r in sorted(first)], busy, stats.steps,
                      stats.wall_s, list(stats.ttft_s))

    return Case(key, section, config, run)


def hive_run(session: inference.InferenceSession, coord: Any, prompts: list[list[int]], n_new: int, m: int,
             on_token: Callable[[int], None] | None = None) -> Sample:
    """One streamed generation on a deployment, with the stages' busy time of this run only."""
    ray.get(coord.reset_stats.remote())
    out: list[list[int]] = [[] for _ in prompts]
    first: dict[int, float] = {}
    count = 0
    t0 = time.perf_counter()
    for chunk in session.generate(prompts, max_new_tokens=n_new, stop=[], microbatches=m, stream=True):
        first.setdefault(chunk.request, time.perf_counter() - t0)
        out[chunk.request].append(chunk.token_id)
        count += 1
        if on_token is not None:
            on_token(count)
    wall = time.perf_counter() - t0
    stages = ray.get(coord.stage_stats.remote())
    last = ray.get(coord.info.remote())["last_stats"]
    return Sample(wall, count, out, [first[r] for r in sorted(first)], [s["busy_s"] for s in stages],
                  last.get("steps"), last.get("wall_s"), list(last.get("ttft_s", [])))


def _hive_case(key: str, session: inference.InferenceSession, prompts: list[list[int]], m: int,
               config: dict[str, Any]) -> Case:
    coord = session.coordinator
    return Case(key, "hive", config, lambda n_new: hive_run(session, coord, prompts, n_new, m))


def _hf_case(key: str, model: Any, prompts: list[list[int]], threads: int, config: dict[str, Any]) -> Case:
    def run(n_new: int) -> Sample:
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            out = hf_generate(model, prompts, n_new)
            wall = time.perf_counter() - t0
        finally:
            torch.set_num_threads(1)
        return Sample(wall, sum(len(o) for o in out), out)

    return Case(key, "unsharded", config, run)


# ---- aggregation -------------------------------------------------------------------------------

def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _rows_equal(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def aggregate(case: Case, hf_out: dict[int, list[list[int]]]) -> dict[str, Any]:
    """Medians over a case's samples, plus bubble / per-hop figures for pipelines."""
    s = case.samples
    p, m, batch = case.config.get("stages", 1), case.config.get("microbatches", 1), case.config["batch"]
    res: dict[str, Any] = {"section": case.section, "key": case.key, "config": case.config}
    rates = [x.tokens / x.wall_s for x in s]
    res["tokens_per_s"] = _r(median(rates), 2)
    res["tokens_per_s_reps"] = [round(r, 2) for r in rates]
    res["wall_s"] = _r(median(x.wall_s for x in s))
    res["tokens"] = s[-1].tokens
    if s[-1].ttft_s:
        res["ttft_mean_s"] = _r(median(_mean(x.ttft_s) or 0.0 for x in s))
    if s[-1].sched_ttft_s:
        res["sched_ttft_mean_s"] = _r(median(_mean(x.sched_ttft_s) or 0.0 for x in s))
    if s[-1].busy_s is not None and s[-1].sched_wall_s:
        res["steps"] = s[-1].steps
        res["sched_tokens_per_s"] = _r(median(x.tokens / x.sched_wall_s for x in s if x.sched_wall_s), 2)
        res["stage_busy_s"] = [_r(median(x.busy_s[i] for x in s if x.busy_s)) for i in range(p)]
        bubbles = [1 - sum(x.busy_s) / (p * x.sched_wall_s) for x in s if x.busy_s and x.sched_wall_s]
        res["bubble_measured"] = _r(median(bubbles))
        m_eff = min(m, batch)
        res["bubble_theory"] = _r((p - 1) / (m_eff + p - 1))
        if m_eff == 1 and case.section == "hive":  # serial steps: wall - compute = overhead
            per_step = [(x.sched_wall_s - sum(x.busy_s)) / x.steps for x in s if x.busy_s and x.steps and x.sched_wall_s]
            res["overhead_per_step_ms"] = _r(1000 * (median(per_step) or 0.0), 3)
            res["per_hop_overhead_ms"] = _r(1000 * (median(per_step) or 0.0) / p, 3)
            res["compute_per_step_ms"] = _r(1000 * (median(sum(x.busy_s) / x.steps for x in s if x.busy_s and x.steps) or 0.0), 3)
    ref = hf_out.get(batch)
    if ref is not None:
        res["match_unsharded_rows"] = _r(_rows_equal(s[-1].outputs, ref), 3)
    return res


def _slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares (slope, intercept) of ys over xs; (None, None) with < 2 distinct xs."""
    if len(set(xs)) < 2:
        return None, None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


# ---- raw Ray baseline ----------------------------------------------------------------------------

@ray.remote(num_cpus=0)  # type: ignore[call-overload]
class RawStage:
    """The raw-Ray baseline: an actor whose forward returns its input (no compute)."""

    def forward(self, x: Any) -> Any:
        return x

    @ray.method(num_returns="streaming")  # type: ignore[misc]
    def stream(self, n: int) -> Any:
        """``n`` token tuples as a streaming generator (as ShardingCoordinator.generate yields
        them), then the seconds the producer spent on them."""
        t0 = time.perf_counter()
        for i in range(n):
            yield (0, i, i, False, None)
        yield time.perf_counter() - t0


def _chain_rtt(actors: Sequence[Any], x: Any, n: int, warmup: int = 20) -> float:
    """Median seconds of ``n`` round trips of ``x`` through ``actors`` in order."""
    lat = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        ref: Any = x
        for a in actors:
            ref = a.forward.remote(ref)
        ray.get(ref)
        if i >= warmup:
            lat.append(time.perf_counter() - t0)
    return statistics.median(lat)


@ray.remote(num_cpus=0)  # type: ignore[call-overload]
class RawCaller:
    """Runs the chain from inside an actor, as the ShardingCoordinator does."""

    def rtt(self, actors: list[Any], x: Any, n: int) -> float:
        return _chain_rtt(actors, x, n)


def bench_raw_ray(hidden: int, stages: Sequence[int], n: int) -> dict[str, Any]:
    log(f"raw Ray: {n} round trips of a [8, 1, {hidden}] tensor through p in {list(stages)} actors; "
        f"a streaming generator of {10 * n} token tuples")
    actors = [RawStage.remote() for _ in range(max(stages))]  # type: ignore[attr-defined]
    caller = RawCaller.remote()  # type: ignore[attr-defined]
    ray.get([a.forward.remote(None) for a in actors])
    x = torch.zeros(8, 1, hidden)
    rtt: dict[int, float] = {}
    rtt_actor: dict[int, float] = {}
    try:
        for p in stages:
            rtt[p] = _chain_rtt(actors[:p], x, n)
            rtt_actor[p] = ray.get(caller.rtt.remote(actors[:p], x, n))
        items = 10 * n
        t0 = time.perf_counter()
        values = [ray.get(ref) for ref in actors[0].stream.remote(items)]
        consumer_s = time.perf_counter() - t0
        producer_s = float(values[-1])
    finally:
        for a in [*actors, caller]:
            ray.kill(a)
    slope, icpt = _slope(list(rtt), [1000 * v for v in rtt.values()])
    slope_a, _ = _slope(list(rtt_actor), [1000 * v for v in rtt_actor.values()])
    return {"section": "raw_ray",
            "config": {"round_trips": n, "tensor": [8, 1, hidden], "actor": "plain @ray.remote(num_cpus=0)",
                       "path": "driver -> actor 1 -> ... -> actor p -> driver; from_actor: the same "
                               "chain driven by another actor (as the ShardingCoordinator drives stages)",
                       "stream": f"{items} yields of a 5-tuple, consumer ray.get()s each"},
            "round_trip_ms": {str(p): round(1000 * v, 3) for p, v in rtt.items()},
            "per_hop_ms": {str(p): round(1000 * v / p, 3) for p, v in rtt.items()},
            "per_hop_slope_ms": _r(slope, 3), "fixed_ms": _r(icpt, 3),
            "from_actor_round_trip_ms": {str(p): round(1000 * v, 3) for p, v in rtt_actor.items()},
            "from_actor_per_hop_ms": {str(p): round(1000 * v / p, 3) for p, v in rtt_actor.items()},
            "from_actor_per_hop_slope_ms": _r(slope_a, 3),
            "stream_producer_ms_per_yield": _r(1000 * producer_s / items, 4),
            "stream_consumer_ms_per_item": _r(1000 * consumer_s / items, 4)}


# ---- recovery ----------------------------------------------------------------------------------

def bench_recovery(session: inference.InferenceSession, prompts: list[list[int]], n_new: int, m: int,
                   kill_after: int) -> dict[str, Any]:
    coord = session.coordinator
    log(f"recovery: reference run (p=2, m={m}, {len(prompts)} x {n_new} tokens)")
    ref = hive_run(session, coord, prompts, n_new, m)
    victim = ray.get(coord.stage_stats.remote())[1]["pid"]
    threshold = kill_after * len(prompts)
    t_kill: list[float] = []
    stamps: list[float] = []

    def on_token(count: int) -> None:
        stamps.append(time.perf_counter())
        if count == threshold:
            os.kill(int(victim), signal.SIGKILL)
            t_kill.append(time.perf_counter())

    log(f"recovery: SIGKILL of stage 1 (pid {victim}) after {threshold} streamed tokens")
    error = None
    try:
        got = hive_run(session, coord, prompts, n_new, m, on_token=on_token)
        outputs = got.outputs
    except Exception as exc:  # noqa: BLE001 - a failed recovery is a result, not a crash
        traceback.print_exc()
        error, outputs = f"{type(exc).__name__}: {exc}"[:500], []
    info = ray.get(session.coordinator.info.remote())
    after = [t for t in stamps if t_kill and t > t_kill[0]]
    new_pid = None
    try:
        new_pid = ray.get(session.coordinator.stage_stats.remote())[1]["pid"]
    except Exception as exc:  # noqa: BLE001 - the stage may still be restarting
        log(f"recovery: stage stats after the run failed: {type(exc).__name__}: {exc}")
    short = [r for r, (o, want) in enumerate(zip(outputs, ref.outputs)) if len(o) < len(want)]
    rec = list(info.get("last_stats", {}).get("recoveries", [])) if not error else []
    log(f"recovery: {rec} s (scheduler), kill -> next token {after[0] - t_kill[0] if after and t_kill else None}")
    return {"section": "recovery",
            "config": {"stages": 2, "microbatches": m, "batch": len(prompts), "max_new_tokens": n_new,
                       "kill": "SIGKILL stage 1 actor", "kill_after_tokens": threshold,
                       "heartbeat_timeout_s": hive.client().config.heartbeat_timeout_s},
            "killed": bool(t_kill), "killed_pid": victim, "new_stage1_pid": new_pid,
            "recoveries_s": [round(x, 4) for x in rec],
            "recovery_s": _r(max(rec)) if rec else None,
            "deployment_recoveries_s": [round(x, 4) for x in info.get("recoveries", [])],
            "kill_to_next_token_s": _r(after[0] - t_kill[0]) if after and t_kill else None,
            "max_token_gap_s": _r(max(b - a for a, b in itertools.pairwise(stamps))) if len(stamps) > 1 else None,
            "tokens_expected": sum(len(o) for o in ref.outputs), "tokens_got": sum(len(o) for o in outputs),
            "requests_short": short,
            "outputs_identical": bool(outputs) and outputs == ref.outputs,
            "error": error}


# ---- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["random", "smollm2"], default="random",
                        help="random-weights Llama (default) or the real SmolLM2-135M-Instruct")
    parser.add_argument("--reps", type=int, default=None, help="measured rounds over all cases (default 1 quick, 3 full)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per request (default 16 quick, 32 full)")
    parser.add_argument("--stages", default="1,2,4", help="pipeline depths p for hive (default %(default)s)")
    parser.add_argument("--microbatches", default="1,2,4,8", help="micro-batch counts m (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=None,
                        help="hive heartbeat_timeout_s (default: hive's own); bounds stage-death detection")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_new = args.max_new_tokens or (16 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 3)
    depths = [int(x) for x in args.stages.split(",")]
    ms = [int(x) for x in args.microbatches.split(",")]
    host = host_info(torch=torch.__version__, torch_threads_driver=1)
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # one thread per stage for the in-process baselines
    results: list[dict[str, Any]] = []
    crashed: list[str] = []

    def section(name: str, fn: Callable[..., Any], *a: Any) -> Any:
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other sections
            traceback.print_exc()
            crashed.append(name)
            results.append({"section": name, "config": {}, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return None

    work = Path(tempfile.mkdtemp(prefix="hive-bench-inference-"))
    if args.model == "smollm2":
        ckpt = inference.smollm2_checkpoint()
        model_cfg: dict[str, Any] = {"name": "SmolLM2-135M-Instruct", "path": str(ckpt)}
    else:
        size = MODEL_SIZES["quick" if args.quick else "full"]
        log(f"building a random Llama checkpoint {size}")
        ckpt = make_random_model(work / "model", size, args.seed)
        model_cfg = {"name": "random-llama", "seed": args.seed, **size}
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    hidden, n_layers = int(hf_cfg["hidden_size"]), int(hf_cfg["num_hidden_layers"])
    depths = [p for p in depths if p <= n_layers]
    prompts = make_prompts(ckpt, 8, args.seed, real=args.model == "smollm2")
    one = prompts[:1]
    model_cfg.update(dtype="float32", prompt_lengths=[len(p) for p in prompts], max_new_tokens=n_new)
    results.append({"section": "model", "config": model_cfg})

    log("memory: unsharded model in a fresh process; a process that only imports the libraries")
    mem_unsharded = section("memory_unsharded", _child, _CHILD_UNSHARDED, str(ckpt), json.dumps(prompts),
                            str(min(n_new, 8)), str(PAD_ID))
    mem_imports = section("memory_imports", _child, _CHILD_IMPORTS)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    full_param_bytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())

    home = tempfile.mkdtemp(prefix="hive-bench-home-")
    settings = {"heartbeat_timeout_s": args.heartbeat_timeout} if args.heartbeat_timeout else {}
    log(f"hive.init(home={home}, num_cpus=4, {settings})")
    hive.init(home=home, num_cpus=4, **settings)
    sessions: dict[int, inference.InferenceSession] = {}
    transports: list[Any] = []
    cases: list[Case] = []
    try:
        raw = section("raw_ray", bench_raw_ray, hidden, depths, 100 if args.quick else 300)
        if raw:
            results.append(raw)
        plans = {}
        for p in depths:
            plans[p] = inference.plan(ckpt, max_batch=8, max_seq_len=256, num_stages=p)
            t0 = time.perf_counter()
            sessions[p] = inference.deploy(plans[p], name=f"bench-p{p}", threads_per_stage=1)
            log(f"deployed p={p} {plans[p].layer_ranges} in {time.perf_counter() - t0:.1f}s")

        # ---- the cases, all on the same prompts
        b8 = {"batch": 8, "max_new_tokens": n_new}
        b1 = {"batch": 1, "max_new_tokens": n_new}
        cases += [
            _hf_case("unsharded:b1", model, one, 1, {**b1, "threads": 1}),
            _hf_case("unsharded:b8", model, prompts, 1, {**b8, "threads": 1}),
            _hf_case("unsharded:b8:t2", model, prompts, 2, {**b8, "threads": 2, "informational": True}),
        ]
        ranges2 = plans[2].layer_ranges if 2 in plans else [(0, n_layers // 2), (n_layers // 2, n_layers)]
        local = inference.LocalTransport([inference.StageCompute(ckpt, a, b) for a, b in ranges2])
        threaded = inference.ThreadedTransport([inference.StageCompute(ckpt, a, b) for a, b in ranges2])
        transports += [local, threaded]
        seq = {"stages": 2, "layer_ranges": ranges2, "transport": "LocalTransport"}
        cases += [
            _inproc_case("sequential:m1:b8", "sequential", local, prompts, 1, {**seq, **b8, "microbatches": 1}),
            _inproc_case("sequential:m1:b1", "sequential", local, one, 1, {**seq, **b1, "microbatches": 1}),
            _inproc_case("sequential:m8:b8", "sequential", local, prompts, 8,
                         {**seq, **b8, "microbatches": 8, "informational": True}),
            _inproc_case("threaded:p2:m8:b8", "threaded", threaded, prompts, 8,
                         {**seq, "transport": "ThreadedTransport", **b8, "microbatches": 8, "informational": True}),
        ]
        for p, sess in sessions.items():
            cfg = {"stages": p, "layer_ranges": plans[p].layer_ranges, "transport": "RayTransport",
                   "threads_per_stage": 1}
            for m in ms:
                cases.append(_hive_case(f"hive:p{p}:m{m}:b8", sess, prompts, m, {**cfg, **b8, "microbatches": m}))
            cases.append(_hive_case(f"hive:p{p}:m1:b1", sess, one, 1, {**cfg, **b1, "microbatches": 1}))

        # ---- TTFT of the unsharded model (generate with max_new_tokens=1)
        ttft = {1: [], 8: []}  # type: dict[int, list[float]]
        hf_generate(model, prompts, 1)
        for _ in range(max(3, reps)):
            for b, ps in ((1, one), (8, prompts)):
                t0 = time.perf_counter()
                hf_generate(model, ps, 1)
                ttft[b].append(time.perf_counter() - t0)

        # ---- warm-up, then interleaved rounds
        log(f"warm-up: {len(cases)} cases")
        for c in cases:
            c.run(min(4, n_new))
        failed: set[str] = set()
        for r in range(reps):
            for c in cases:
                if c.key in failed:
                    continue
                try:
                    c.samples.append(c.run(n_new))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    crashed.append(c.key)
                    results.append({"section": c.section, "key": c.key, "config": c.config,
                                    "error": f"{type(exc).__name__}: {exc}"[:500]})
                    c.samples.clear()
                    failed.add(c.key)  # skip it from now on
                    continue
                smp = c.samples[-1]
                log(f"round {r + 1}/{reps} {c.key:<22} {smp.tokens / smp.wall_s:8.1f} tok/s  "
                    f"wall {smp.wall_s:.2f}s")

        # ---- aggregate
        hf_out = {c.config["batch"]: c.samples[-1].outputs for c in cases
                  if c.key in ("unsharded:b1", "unsharded:b8") and c.samples}
        agg = {c.key: aggregate(c, hf_out) for c in cases if c.samples}
        for key in ("unsharded:b1", "unsharded:b8"):
            if key in agg:
                agg[key]["ttft_s"] = _r(median(ttft[int(key[-1])]))
        p1 = {m: agg.get(f"hive:p1:m{m}:b8", {}).get("tokens_per_s") for m in ms}
        seq_b8 = agg.get("sequential:m1:b8", {}).get("tokens_per_s")
        hf_b8 = agg.get("unsharded:b8", {}).get("tokens_per_s")
        for key, a in agg.items():
            tps = a["tokens_per_s"]
            if a["section"] == "hive" and a["config"]["batch"] == 8:
                base = p1.get(a["config"]["microbatches"])
                a["vs_p1_same_m"] = _r(tps / base, 3) if base else None
            if a["config"]["batch"] == 8:
                a["vs_sequential"] = _r(tps / seq_b8, 3) if seq_b8 else None
                a["vs_unsharded"] = _r(tps / hf_b8, 3) if hf_b8 else None
        results.extend(agg.values())
        pts = [(a["config"]["stages"], a["overhead_per_step_ms"]) for a in agg.values()
               if a["section"] == "hive" and a["config"]["batch"] == 8 and "overhead_per_step_ms" in a]
        slope, icpt = _slope([x for x, _ in pts], [y for _, y in pts])
        # the same deployment at batch 1 streams 1 token per step instead of 8: the difference / 7
        # is what one more streamed token costs the scheduler's critical path
        per_token = [(agg[f"hive:p{p}:m1:b8"]["overhead_per_step_ms"] - agg[f"hive:p{p}:m1:b1"]["overhead_per_step_ms"]) / 7
                     for p in sessions if "overhead_per_step_ms" in agg.get(f"hive:p{p}:m1:b8", {})
                     and "overhead_per_step_ms" in agg.get(f"hive:p{p}:m1:b1", {})]
        results.append({"section": "per_hop",
                        "config": {"method": "m=1, batch 8: (scheduler wall - sum stage busy_s) / steps, "
                                             "per hop = / p; slope = least squares over p"},
                        "overhead_per_step_ms": {str(p): y for p, y in pts},
                        "per_hop_ms": {str(p): round(y / p, 3) for p, y in pts},
                        "per_hop_slope_ms": _r(slope, 3), "fixed_per_step_ms": _r(icpt, 3),
                        "overhead_per_step_b1_ms": {str(p): agg[f"hive:p{p}:m1:b1"].get("overhead_per_step_ms")
                                                    for p in sessions if f"hive:p{p}:m1:b1" in agg},
                        "streamed_token_cost_ms_est": _r(median(per_token), 3),
                        "raw_ray_per_hop_slope_ms": raw.get("per_hop_slope_ms") if raw else None,
                        "raw_ray_stream_producer_ms_per_yield": raw.get("stream_producer_ms_per_yield") if raw else None})

        # ---- memory
        mem: dict[str, Any] = {"section": "memory",
                               "config": {"peak": "VmHWM of each stage process (includes shard loading)",
                                          "unsharded": "fresh process: from_pretrained + generate batch 8",
                                          "imports_only": "fresh process importing torch, transformers, ray, "
                                                          "hive, inference (no Ray worker)"},
                               "full_param_bytes": full_param_bytes}
        if mem_unsharded:
            mem["unsharded_rss_bytes"] = mem_unsharded.get("rss_bytes")
            mem["unsharded_peak_rss_bytes"] = mem_unsharded.get("peak_rss_bytes")
        if mem_imports:
            mem["imports_only_rss_bytes"] = mem_imports.get("rss_bytes")
        for p, sess in sessions.items():
            stats = ray.get(sess.coordinator.stage_stats.remote())
            stages = []
            for s in stats:
                pm = proc_memory(int(s["pid"]))
                stages.append({"layers": [s["layer_start"], s["layer_end"]], "param_bytes": s["param_bytes"],
                               "rss_bytes": s["rss_bytes"], "peak_rss_bytes": pm["peak_rss_bytes"],
                               "load_s": _r(s.get("load_s"), 3)})
            peak = [s["peak_rss_bytes"] for s in stages if s["peak_rss_bytes"]]
            mem[f"p{p}"] = {
                "stages": stages,
                "max_stage_param_frac": _r(max(s["param_bytes"] for s in stages) / full_param_bytes),
                "sum_param_frac": _r(sum(s["param_bytes"] for s in stages) / full_param_bytes),
                "max_stage_peak_rss_vs_unsharded": _r(max(peak) / mem["unsharded_peak_rss_bytes"])
                if peak and mem.get("unsharded_peak_rss_bytes") else None,
            }
        results.append(mem)

        # ---- recovery (last: it restarts a stage of the p=2 deployment)
        if 2 in sessions:
            rec = section("recovery", bench_recovery, sessions[2], prompts, n_new, 8, max(1, n_new // 4))
            if rec:
                results.append(rec)
    finally:
        for t in transports:
            t.close()
        for sess in sessions.values():
            try:
                sess.undeploy()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        hive.shutdown()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    # ---- goals, tables, JSON
    by = {r.get("key", r["section"]): r for r in results}

    def get(key: str, *path: str) -> Any:
        return dig(by, key, *path)

    identical = get("recovery", "outputs_identical")
    goals = [
        goal("p2_m8_vs_p1_m8_tokens_per_s", get("hive:p2:m8:b8", "vs_p1_same_m"), ">=", 1.5),
        goal("p2_m8_vs_sequential_tokens_per_s", get("hive:p2:m8:b8", "vs_sequential"), ">=", 1.3),
        goal("per_hop_overhead_ms", get("hive:p2:m1:b8", "per_hop_overhead_ms"), "<=", 2.0),
        goal("recovery_s", get("recovery", "recovery_s"), "<=", 5.0),
        goal("outputs_identical_after_kill", None if identical is None else int(identical), "==", 1),
    ]
    print_tables(results)
    print_goals(goals)
    duration = round(time.perf_counter() - t_start, 1)
    path = write_json(BENCHMARK, args.quick, results, goals, args.out, host=host, argv=sys.argv[1:],
                      duration_s=duration, loadavg_at_end=host_info()["loadavg_1_5_15"], crashed_sections=crashed)
    print(f"wrote {path} ({duration}s)")
    if crashed:
        print(f"sections that crashed: {', '.join(crashed)}")
    return 1 if crashed else 0


def _mib(x: Any) -> str:
    return "-" if not x else f"{x / 2**20:,.1f} MiB"


def print_tables(results: Sequence[dict[str, Any]]) -> None:
    rows: list[tuple[Any, ...]] = []
    for r in results:
        if r["section"] not in ("unsharded", "sequential", "threaded", "hive") or "tokens_per_s" not in r:
            continue
        c = r["config"]
        rows.append((r["section"], f"p={c.get('stages', 1)} m={c.get('microbatches', '-')} b={c['batch']}"
                     + (f" t={c['threads']}" if "threads" in c else ""),
                     r["tokens_per_s"], r.get("vs_p1_same_m"), r.get("vs_sequential"), r.get("vs_unsharded"),
                     1000 * r["ttft_mean_s"] if r.get("ttft_mean_s") is not None else
                     (1000 * r["ttft_s"] if r.get("ttft_s") is not None else None),
                     r.get("bubble_measured"), r.get("bubble_theory"), r.get("per_hop_overhead_ms"),
                     r.get("match_unsharded_rows")))
    print_table("Throughput (medians; tok/s = all generated tokens / driver wall)",
                ["section", "config", "tok/s", "vs p1 same m", "vs sequential", "vs unsharded", "TTFT ms",
                 "bubble", "bubble (p-1)/(m+p-1)", "per-hop ms", "= unsharded"], rows)
    by = {r.get("key", r["section"]): r for r in results}
    hop, raw = by.get("per_hop"), by.get("raw_ray")
    if hop:
        print_table("Per-hop overhead (ms)", ["what", "p", "value"],
                    [("hive per step (m=1, b=8)", p, v) for p, v in hop["overhead_per_step_ms"].items()]
                    + [("hive per hop", p, v) for p, v in hop["per_hop_ms"].items()]
                    + [("hive slope over p", "-", hop["per_hop_slope_ms"])]
                    + [("hive per step (m=1, b=1)", p, v) for p, v in hop["overhead_per_step_b1_ms"].items()]
                    + [("one more streamed token (b8-b1)/7", "-", hop["streamed_token_cost_ms_est"])]
                    + ([("raw Ray per hop", p, v) for p, v in raw["per_hop_ms"].items()]
                       + [("raw Ray slope over p", "-", raw["per_hop_slope_ms"])]
                       + [("raw Ray per hop, from an actor", p, v) for p, v in raw["from_actor_per_hop_ms"].items()]
                       + [("raw Ray slope over p, from an actor", "-", raw["from_actor_per_hop_slope_ms"]),
                          ("raw Ray stream: producer per yield", "-", raw["stream_producer_ms_per_yield"]),
                          ("raw Ray stream: consumer per item", "-", raw["stream_consumer_ms_per_item"])]
                       if raw and "per_hop_ms" in raw else []))
    mem = by.get("memory")
    if mem:
        rows = [("full model params", "-", _mib(mem.get("full_param_bytes")), "-", "-"),
                ("unsharded process", "-", _mib(mem.get("full_param_bytes")), _mib(mem.get("unsharded_rss_bytes")),
                 _mib(mem.get("unsharded_peak_rss_bytes"))),
                ("imports only", "-", "-", _mib(mem.get("imports_only_rss_bytes")), "-")]
        for key, val in mem.items():
            if key.startswith("p") and isinstance(val, dict) and "stages" in val:
                for i, s in enumerate(val["stages"]):
                    rows.append((f"{key} stage {i}", f"{s['layers'][0]}-{s['layers'][1] - 1}", _mib(s["param_bytes"]),
                                 _mib(s["rss_bytes"]), _mib(s["peak_rss_bytes"])))
        print_table("Memory", ["what", "layers", "params", "RSS", "peak RSS"], rows)
    rec = by.get("recovery")
    if rec:
        print_table("Recovery after SIGKILL of stage 1", ["metric", "value"],
                    [(k, fmt(rec.get(k))) for k in ("recovery_s", "recoveries_s", "kill_to_next_token_s",
                                                    "max_token_gap_s", "tokens_expected", "tokens_got",
                                                    "requests_short", "outputs_identical", "error")])


if __name__ == "__main__":
    sys.exit(main())
