"""deploy / attach / InferenceSession: the caller's side of sharded inference."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

import hive
from inference._exceptions import InferenceError
from inference._plan import ShardingPlan
from inference._sharding import ShardingCoordinator
from inference._stage_actor import StageActor

__all__ = ["Completion", "InferenceSession", "TokenChunk", "attach", "deploy", "deployments"]


@dataclass(frozen=True)
class TokenChunk:
    """One streamed token."""

    request: int  # index of the prompt
    token_id: int  # the token
    text: str  # its decoded text (may be "" for a partial multi-byte piece)
    finished: bool  # last token of this request
    finish_reason: str | None  # "stop" | "length" on the last token


@dataclass
class Completion:
    """A finished request."""

    prompt: str | list[int]  # what was asked
    token_ids: list[int] = field(default_factory=list)  # generated tokens
    text: str = ""  # decoded generation
    finish_reason: str | None = None  # "stop" | "length"


def _deploy_dir() -> Path:
    path = hive.client().config.home / "inference"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ray_node_id(node_id: str) -> str | None:
    """The node id if it is a real Ray node id (56 hex digits), else None (no affinity)."""
    return node_id if re.fullmatch(r"[0-9a-f]{56}", node_id or "") else None


def _stage_resources(plan: ShardingPlan, i: int) -> dict[str, float]:
    resource = plan.stages[i].device.ray_resource  # "GPU" (or a custom GPU-like resource); None on CPU
    return {resource: 1.0} if resource else {}


def deploy(plan: ShardingPlan, *, name: str | None = None, threads_per_stage: int | None = 1) -> InferenceSession:
    """Start one StageActor per stage (shards load in parallel) and a ShardingCoordinator.

    Args:
        plan: from ``inference.plan(...)``.
        name: deployment name (default: derived from the model directory); must be unique.
        threads_per_stage: torch intra-op threads per CPU stage (None = torch's default).

    Returns:
        An InferenceSession.

    Raises:
        InferenceError: the name is taken; AgentSpawnError when a stage cannot start.

    Example:
        >>> # session = inference.deploy(inference.plan("ckpt/", max_batch=8))
    """
    client = hive.client()
    name = name or Path(plan.model_path).name.replace(".", "-")
    record_path = _deploy_dir() / f"{name}.json"
    if record_path.exists():
        raise InferenceError(f"a deployment named {name!r} exists ({record_path}); undeploy it "
                             f"(`hive infer undeploy {name}`) or pass another name", name=name)
    t0 = time.perf_counter()

    def start(i: int) -> str:
        st = plan.stages[i]
        [aid] = client.spawn(StageActor, 1, plan.model_path, st.layer_start, st.layer_end, i, plan.dtype,
                             threads_per_stage, resources=_stage_resources(plan, i),
                             node_id=_ray_node_id(st.device.node_id))
        return aid

    with ThreadPoolExecutor(max_workers=len(plan.stages)) as pool:
        stage_ids = list(tqdm(pool.map(start, range(len(plan.stages))), total=len(plan.stages),
                              desc=f"loading {len(plan.stages)} stages", leave=False))
    [coord_id] = client.spawn(ShardingCoordinator, 1, name, plan.to_json(), stage_ids)
    record = {"name": name, "coordinator": coord_id, "stages": stage_ids, "plan": json.loads(plan.to_json()),
              "deployed_s": round(time.perf_counter() - t0, 3), "created": time.time()}
    record_path.write_text(json.dumps(record, indent=2))
    return InferenceSession(record)


def deployments() -> list[dict[str, Any]]:
    """Records of the deployments in this hive home."""
    return [json.loads(p.read_text()) for p in sorted(_deploy_dir().glob("*.json"))]


def attach(name: str) -> InferenceSession:
    """Reconnect to a running deployment by name (e.g. from another process or the CLI).

    Raises:
        InferenceError: no such deployment (the message lists the known ones).
    """
    path = _deploy_dir() / f"{name}.json"
    if not path.exists():
        known = [d["name"] for d in deployments()]
        raise InferenceError(f"no deployment named {name!r}; known: {known}. Deploy with `hive infer deploy`.", name=name)
    return InferenceSession(json.loads(path.read_text()))


class InferenceSession:
    """A deployed model: ``generate``, ``status``, ``rebalance``, ``undeploy``."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.name: str = record["name"]
        self.plan = ShardingPlan.from_json(json.dumps(record["plan"]))
        self._tokenizer: Any = None

    def __repr__(self) -> str:
        return f"InferenceSession({self.name!r}, stages={len(self.plan.stages)})"

    @property
    def coordinator(self) -> Any:
        """The ShardingCoordinator actor handle."""
        handle = hive.client().agent_handle(self.record["coordinator"])
        if handle is None:
            raise InferenceError(f"deployment {self.name}: its coordinator is restarting; retry shortly", name=self.name)
        return handle

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded once, in this process)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.plan.model_path)
        return self._tokenizer

    def _encode(self, prompts: Sequence[str | Sequence[int]], chat: bool) -> list[list[int]]:
        out = []
        for p in prompts:
            if not isinstance(p, str):
                out.append([int(t) for t in p])
            elif chat:
                out.append(list(self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False)))
            else:
                out.append(list(self.tokenizer(p)["input_ids"]))
        return out

    def generate(self, prompts: str | Sequence[str | Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[int] | None = None, microbatches: int | None = None, chat: bool = False,
                 stream: bool = False) -> Any:
        """Generate for one prompt or many, pipelined over the stages.

        Args:
            prompts: a text or a token-id list, or a list of either.
            max_new_tokens: per request.
            temperature, top_k, top_p, seed: sampling (temperature 0 = greedy; a seed makes it reproducible).
            stop: stop token ids (default: the tokenizer's eos).
            microbatches: groups in flight (default: min(#prompts, 2 x stages)).
            chat: wrap text prompts in the tokenizer's chat template.
            stream: yield TokenChunk as tokens arrive instead of returning Completions.

        Returns:
            list[Completion] (or an iterator of TokenChunk when ``stream``).
        """
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        items: list[Any] = [prompts] if single else list(prompts)
        ids = self._encode(items, chat)
        tok = self.tokenizer if any(isinstance(p, str) for p in items) or stop is None else None
        stop_ids = list(stop) if stop is not None else ([tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else [])
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        m = microbatches or min(len(ids), 2 * len(self.plan.stages))
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        gen = self.coordinator.generate.remote(ids, max_new_tokens, sampling, m, stop_ids, pad)
        chunks = self._chunks(gen, tok)
        if stream:
            return chunks
        done = [Completion(prompt=p) for p in items]
        for c in chunks:
            done[c.request].token_ids.append(c.token_id)
            if c.finished:
                done[c.request].finish_reason = c.finish_reason
        for comp in done:
            comp.text = tok.decode(comp.token_ids, skip_special_tokens=True) if tok is not None else ""
        return done

    def _chunks(self, gen: Any, tok: Any) -> Iterator[TokenChunk]:
        for ref in gen:
            for request, token_id, _index, finished, reason in ray.get(ref):
                text = tok.decode([token_id], skip_special_tokens=True) if tok is not None else ""
                yield TokenChunk(request=request, token_id=token_id, text=text, finished=finished,
                                 finish_reason=reason)

    def status(self) -> dict[str, Any]:
        """Health and per-stage measurements (busy time, calls, parameter bytes, RSS)."""
        coord = self.coordinator
        health = ray.get(coord.health.remote())
        stats = ray.get(coord.stage_stats.remote()) if all(h["ok"] for h in health) else []
        return {"name": self.name, "health": health, "stages": stats, "info": ray.get(coord.info.remote())}

    def stage_latencies(self) -> list[float]:
        """Mean seconds per forward call of each stage since the last reset."""
        stats = ray.get(self.coordinator.stage_stats.remote())
        return [s["busy_s"] / s["calls"] if s["calls"] else 0.0 for s in stats]

    def rebalance(self, margin: float = 0.2, apply: bool = False) -> dict[str, Any]:
        """Propose (and optionally apply) a new plan when the slowest stage exceeds the fastest by ``margin``.

        Measured per-stage latency per layer becomes each device's throughput weight and the
        planner partitions again. Applying it redeploys the stages (between generations).

        Returns:
            ``{"imbalance": ratio, "needed": bool, "proposal": ShardingPlan | None, "applied": bool}``.
        """
        from inference._rebalance import replan_with_throughput

        lat = self.stage_latencies()
        busy = [x for x in lat if x > 0]
        if len(busy) < 2:
            return {"imbalance": 1.0, "needed": False, "proposal": None, "applied": False, "latencies": lat}
        imbalance = max(busy) / min(busy)
        needed = imbalance > 1 + margin
        proposal = replan_with_throughput(self.plan, lat) if needed else None
        applied = False
        if apply and proposal is not None and proposal.stages != self.plan.stages:
            self.undeploy()
            new = deploy(proposal, name=self.name)
            self.record, self.plan = new.record, new.plan
            applied = True
        return {"imbalance": imbalance, "needed": needed, "proposal": proposal, "applied": applied, "latencies": lat}

    def undeploy(self) -> None:
        """Terminate the coordinator and every stage, and forget the deployment."""
        client = hive.client()
        for aid in [self.record["coordinator"], *self.record["stages"]]:
            try:
                client.terminate(aid)
            except hive.AgentNotFoundError:
                pass
        (_deploy_dir() / f"{self.name}.json").unlink(missing_ok=True)
