"""Before a merge writes anything: open the inputs, check they fit together, plan each tensor.

``open_inputs`` indexes every checkpoint of a recipe once (``SafetensorsReader``);
``check_output`` / ``check_architectures`` refuse a bad output directory or mixed architectures;
``plan_merge`` lists the output tensors in the template's order with the key to read from each
input, checking that every model has every tensor in the same shape. Every error names the
model and, for tensors, the tensor (``MergeError.tensor``).

Tied embeddings: the template decides. A tensor the template lacks is never written (a tied
base stays tied); when the template has an ``lm_head.weight`` that a tied model does not store,
that model's input embedding stands in for it.

Example:
    >>> with ExitStack() as stack:                                        # doctest: +SKIP
    ...     base, models, template = open_inputs(recipe, stack)
    ...     steps = plan_merge(recipe, template, base, models)
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolution._exceptions import MergeError
from evolution._recipe import MergeRecipe
from evolution._tensor_reader import SafetensorsReader
from evolution._tensor_writer import OutTensor

__all__ = [
    "MergeInput",
    "PlanStep",
    "check_architectures",
    "check_output",
    "open_inputs",
    "plan_merge",
]

_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergeInput:
    """One input checkpoint as the merge sees it."""

    label: str  # "base model" / "models[1]", for messages
    path: Path  # checkpoint directory
    config: dict[str, Any]  # its config.json
    reader: SafetensorsReader  # its tensor index (shared when two inputs are one directory)


@dataclass(frozen=True)
class PlanStep:
    """How one output tensor is produced."""

    out: OutTensor  # name, output dtype, shape
    base_key: str | None  # key read from the base (None when the method takes no base)
    model_keys: tuple[str, ...]  # key read from each model
    merged: bool  # False: copied from the template (integer/bool tensors)

    @property
    def name(self) -> str:
        return self.out.name


def open_inputs(
    recipe: MergeRecipe, stack: ExitStack
) -> tuple[MergeInput | None, list[MergeInput], MergeInput]:
    """Open every input once; returns (base or None, models, template)."""
    readers: dict[Path, SafetensorsReader] = {}

    def open_input(label: str, path_text: str) -> MergeInput:
        path = Path(path_text)
        if not path.is_dir():
            raise MergeError(
                f"{label} path {path} does not exist or is not a directory; recipe paths are "
                "local checkpoint directories (relative paths resolve against the recipe file)",
                path=str(path),
                tensor=None,
            )
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise MergeError(
                f"{label} {path} has no readable config.json ({exc}); a checkpoint directory "
                "needs it (model.save_pretrained(dir) writes one)",
                path=str(path),
                tensor=None,
            ) from exc
        if path not in readers:
            readers[path] = stack.enter_context(SafetensorsReader.open(path))
        return MergeInput(label, path, config, readers[path])

    base = None if recipe.base_model is None else open_input("base model", recipe.base_model)
    models = [open_input(f"models[{i}]", m.path) for i, m in enumerate(recipe.models)]
    return base, models, base if base is not None else models[0]


def check_output(out: Path, bases: list[Path], models: list[Path], overwrite: bool) -> None:
    """Refuse an output directory that is an input, or not empty (unless ``overwrite``)."""
    if out in (*bases, *models):
        raise MergeError(
            f"output directory {out} is one of the inputs; write the merge somewhere else",
            path=str(out),
            tensor=None,
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(
            f"output directory {out} exists and is not empty; choose a new directory or pass "
            "overwrite=True (--overwrite) to replace it",
            path=str(out),
            tensor=None,
        )


def _arch(config: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def check_architectures(template: MergeInput, inputs: list[MergeInput]) -> None:
    """Refuse inputs whose config ``model_type`` / ``architectures`` differ from the template's."""
    want = _arch(template.config)
    for item in inputs:
        got = _arch(item.config)
        if got != want:
            raise MergeError(
                f"architecture mismatch: {item.label} {item.path} is model_type={got[0]!r} "
                f"architectures={list(got[1])} but {template.label} {template.path} is "
                f"model_type={want[0]!r} architectures={list(want[1])}; merge only checkpoints "
                "of one architecture",
                path=str(item.path),
                tensor=None,
            )


def _ties_embeddings(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _resolve(name: str, item: MergeInput, template: MergeInput) -> str:
    """The key holding template tensor ``name`` in ``item`` (tied heads map to the embedding)."""
    if name in item.reader.entries:
        return name
    if name.endswith("lm_head.weight") and _ties_embeddings(item.config):
        for key in item.reader.entries:
            if _EMBEDDING_RE.search(key):
                return key
    raise MergeError(
        f"tensor {name!r} is missing from {item.label} {item.path}; every model needs every "
        f"tensor of {template.label} {template.path} — the checkpoint is incomplete or has "
        "another layout (layer count, untied head)",
        tensor=name,
        path=str(item.path),
    )


def plan_merge(
    recipe: MergeRecipe, template: MergeInput, base: MergeInput | None, models: list[MergeInput]
) -> list[PlanStep]:
    """Output tensors in template order, with the keys to read; checks names and shapes."""
    out_dtype = _DTYPES[recipe.dtype] if recipe.dtype is not None else None
    steps: list[PlanStep] = []
    for name, entry in template.reader.entries.items():
        merged = entry.dtype.is_floating_point
        keys: list[str] = []
        for item in [base, *models] if merged else []:
            if item is None:
                continue
            key = _resolve(name, item, template)
            shape = item.reader.entries[key].shape
            if shape != entry.shape:
                raise MergeError(
                    f"tensor {name!r} has shape {list(shape)} in {item.label} {item.path} but "
                    f"{list(entry.shape)} in {template.label} {template.path}; the models differ "
                    "in size (hidden size, vocabulary, heads) and cannot be merged tensor by tensor",
                    tensor=name,
                    path=str(item.path),
                )
            keys.append(key)
        dtype = out_dtype if merged and out_dtype is not None else entry.dtype
        steps.append(
            PlanStep(
                out=OutTensor(name, dtype, entry.shape),
                base_key=keys.pop(0) if merged and base is not None else None,
                model_keys=tuple(keys),
                merged=merged,
            )
        )
    return steps
