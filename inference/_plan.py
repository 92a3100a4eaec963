"""Sharding plan models: which device runs which contiguous range of decoder layers.

A ``ShardingPlan`` crosses process boundaries (the coordinator hands it to every stage actor,
``hive`` stores it), so it and its parts are frozen pydantic models, validated on arrival.
``print(plan)`` shows it as a table; ``plan.to_json()`` / ``ShardingPlan.from_json()`` and
``plan.save(path)`` / ``ShardingPlan.load(path)`` move it around.

Example:
    >>> gpu = DeviceInfo(device_id="node-ab12/gpu:0", node_id="ab12", kind="gpu",
    ...                  name="H100", total_bytes=80 * 2**30, free_bytes=79 * 2**30)
    >>> gpu.free_bytes // 2**30
    79
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["DeviceInfo", "ShardingPlan", "StagePlan", "format_bytes"]


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**30)`` -> ``"3.00 GiB"``; negatives keep the sign."""
    sign, value = ("-" if n < 0 else ""), float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} B" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class DeviceInfo(BaseModel):
    """One device a stage can run on: a GPU, or a CPU slot with a RAM budget.

    ``throughput`` is a relative speed (higher is faster); only ratios between devices matter.
    Set it from ``measure_throughput()`` or by hand: ``dev.model_copy(update={"throughput": 2.0})``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str = Field(min_length=1)  # unique in a cluster: "node-ab12/gpu:0", "node-ab12/cpu:1"
    node_id: str = Field(min_length=1)  # Ray node id (hex) of the machine holding the device
    kind: Literal["gpu", "cpu"]
    name: str  # "NVIDIA H100 80GB HBM3", "cpu (8 logical CPUs)"
    total_bytes: int = Field(ge=0)  # device memory, or the RAM budget of a CPU slot
    free_bytes: int = Field(ge=0)  # what a stage may use on it
    throughput: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # relative speed
    ray_resource: str | None = None  # Ray resource a stage here reserves 1 of ("GPU", "sim_gpu"); None: CPU slot


class StagePlan(BaseModel):
    """One pipeline stage: decoder layers ``[layer_start, layer_end)`` on ``device``.

    ``est_cost`` is the stage's compute bytes (its layers, plus the LM head on the last stage)
    divided by ``device.throughput``: a relative time per token, comparable across stages.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: int = Field(ge=0)
    device: DeviceInfo
    layer_start: int = Field(ge=0)
    layer_end: int = Field(ge=1)  # exclusive
    has_embeddings: bool  # holds the token (and position) embeddings: the first stage
    has_head: bool  # holds the final norm + LM head: the last stage
    param_bytes: int = Field(ge=0)  # layers + embeddings/head it holds (a tied matrix once)
    kv_bytes: int = Field(ge=0)  # KV cache for max_batch x max_seq_len over its layers
    activation_bytes: int = Field(ge=0)  # transient activation reserve
    est_cost: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_range(self) -> StagePlan:
        if self.layer_end <= self.layer_start:
            raise ValueError(
                f"stage {self.stage}: empty layer range [{self.layer_start}, {self.layer_end}); "
                "every stage needs at least one layer"
            )
        return self

    @property
    def num_layers(self) -> int:
        """Number of decoder layers the stage holds."""
        return self.layer_end - self.layer_start

    @property
    def needed_bytes(self) -> int:
        """Memory the stage needs: parameters + KV cache + activation reserve."""
        return self.param_bytes + self.kv_bytes + self.activation_bytes

    @property
    def headroom_bytes(self) -> int:
        """``device.free_bytes`` minus what the stage needs (negative: it does not fit)."""
        return self.device.free_bytes - self.needed_bytes

    @property
    def layers_label(self) -> str:
        """Inclusive layer range as shown in tables: ``"0-11"`` (or ``"7"`` for one layer)."""
        last = self.layer_end - 1
        return str(last) if last == self.layer_start else f"{self.layer_start}-{last}"


class ShardingPlan(BaseModel):
    """A complete pipeline: stage ``i`` holds a contiguous layer range on its own device.

    Validated on construction (and so on arrival from JSON): stages are numbered ``0..p-1``,
    their ranges are contiguous and cover ``0..num_layers``, each holds at least one layer, only
    the first holds the embeddings and only the last the head, and no device is used twice.

    Example:
        >>> plan = ShardingPlan.load("plan.json")  # doctest: +SKIP
        >>> print(plan)  # doctest: +SKIP
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str  # checkpoint directory ("" when planned from bare LayerCosts)
    arch: str  # model_type from the config: "llama", "gpt2", ...
    num_layers: int = Field(ge=1)
    dtype: str  # torch dtype name the stages run in: "bfloat16", "float32", ...
    max_batch: int = Field(ge=1)  # sequences the KV cache is sized for
    max_seq_len: int = Field(ge=1)  # tokens per sequence the KV cache is sized for
    stages: tuple[StagePlan, ...] = Field(min_length=1)
    bottleneck: float = Field(ge=0, allow_inf_nan=False)  # max est_cost over the stages
    created_ts: float  # time.time() when planned

    @model_validator(mode="after")
    def _check_pipeline(self) -> ShardingPlan:
        last = len(self.stages) - 1
        expected_start = 0
        for i, stage in enumerate(self.stages):
            where = f"stage {i} (layers [{stage.layer_start}, {stage.layer_end}))"
            if stage.stage != i:
                raise ValueError(f"stages must be numbered 0..{last} in order; position {i} says {stage.stage}")
            if stage.layer_start != expected_start:
                kind = "gap" if stage.layer_start > expected_start else "overlap"
                raise ValueError(
                    f"{where}: ranges are not contiguous ({kind}); expected it to start at "
                    f"layer {expected_start}"
                )
            if stage.has_embeddings != (i == 0):
                raise ValueError(f"{where}: the embeddings must live on the first stage and only there")
            if stage.has_head != (i == last):
                raise ValueError(f"{where}: the LM head must live on the last stage and only there")
            expected_start = stage.layer_end
        if expected_start != self.num_layers:
            raise ValueError(
                f"the stages cover layers [0, {expected_start}) but the model has {self.num_layers} "
                "layers; the last stage must end at num_layers"
            )
        ids = [s.device.device_id for s in self.stages]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a device runs more than one stage: {ids}; give each stage its own device")
        worst = max(s.est_cost for s in self.stages)
        if not math.isclose(self.bottleneck, worst, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"bottleneck {self.bottleneck} is not the largest stage est_cost ({worst})")
        return self

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages."""
        return len(self.stages)

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        """``[(layer_start, layer_end), ...]`` per stage (reusable as ``plan(layer_ranges=...)``)."""
        return [(s.layer_start, s.layer_end) for s in self.stages]

    def stage_of_layer(self, layer: int) -> StagePlan:
        """The stage holding decoder layer ``layer``.

        Raises:
            IndexError: ``layer`` is outside ``0..num_layers-1``.
        """
        for stage in self.stages:
            if stage.layer_start <= layer < stage.layer_end:
                return stage
        raise IndexError(f"layer {layer} is outside the model's {self.num_layers} layers")

    # ---------------------------------------------------------------------------- rendering

    def table(self) -> Table:
        """A rich table: stage, device, node, layers, what it holds, params, KV cache, headroom, load.

        ``load`` is the stage's ``est_cost`` relative to the bottleneck (the slowest stage: 100%, ``*``).
        """
        title = escape(
            f"{self.arch} · {self.num_layers} layers · {self.dtype} · "
            f"batch {self.max_batch} × seq {self.max_seq_len} · {self.num_stages} stage(s)"
        )
        table = Table(title=title, caption=f"load = est_cost / bottleneck ({self.bottleneck:.4g})")
        for header in ("stage", "device", "node", "layers", "holds", "params", "KV cache", "headroom", "load"):
            justify = "right" if header in {"stage", "params", "KV cache", "headroom", "load"} else "left"
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
        for s in self.stages:
            holds = ", ".join(x for x, on in (("embed", s.has_embeddings), ("head", s.has_head)) if on)
            headroom = format_bytes(s.headroom_bytes)
            load = s.est_cost / self.bottleneck if self.bottleneck > 0 else 1.0
            table.add_row(
                str(s.stage), escape(s.device.device_id), escape(s.device.node_id[:12]), s.layers_label, holds or "-",
                format_bytes(s.param_bytes), format_bytes(s.kv_bytes),
                headroom if s.headroom_bytes >= 0 else f"[red]{headroom}[/red]",
                f"{load:.0%}" + (" *" if s.est_cost == self.bottleneck else ""),
            )
        return table

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=140, color_system=None, force_terminal=False).print(self.table())
        return buffer.getvalue().rstrip("\n")

    # ---------------------------------------------------------------------------- persistence

    def to_json(self, indent: int | None = None) -> str:
        """The plan as JSON (``ShardingPlan.from_json`` reads it back, validating it)."""
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardingPlan:
        """Parse and validate a plan written by ``to_json``.

        Raises:
            pydantic.ValidationError: malformed JSON or a plan that breaks the pipeline rules.
        """
        return cls.model_validate_json(text)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as indented JSON to ``path`` (parents created); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.to_json(indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardingPlan:
        """Read a plan written by ``save``.

        Raises:
            FileNotFoundError: no file at ``path``.
            pydantic.ValidationError: the file is not a valid plan.
        """
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
