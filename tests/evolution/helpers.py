"""Helpers of the evolution tests: tiny model sets, checkpoint surgery, reference merges."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from evolution._recipe import MergeRecipe
from evolution.merge_methods import get_method
from tests.factories import make_tiny_model

__all__ = [
    "TinySet",
    "edit_checkpoint",
    "load_weights",
    "make_synthetic_checkpoint",
    "make_tiny_set",
    "reference_merge",
]


@dataclass(frozen=True)
class TinySet:
    """A base checkpoint and fine-tunes that share its architecture."""

    base: Path
    models: tuple[Path, ...]


def make_tiny_set(root: Path, arch: str, n_models: int = 3) -> TinySet:
    """A base (seed 0) and ``n_models`` "fine-tunes": the base plus small seeded perturbations.

    Real fine-tunes sit close to their base, which is what task-vector methods assume; random
    models of different seeds would make every task vector as large as the weights.
    """
    base = make_tiny_model(arch, root / "base", seed=0)
    base_weights = load_file(base / "model.safetensors")
    models = []
    for i in range(1, n_models + 1):
        path = root / f"ft{i}"
        shutil.copytree(base, path)
        gen = torch.Generator().manual_seed(100 + i)
        tuned = {
            k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base_weights.items()
        }
        save_file(tuned, path / "model.safetensors", metadata={"format": "pt"})
        models.append(path)
    return TinySet(base, tuple(models))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards), in memory."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def edit_checkpoint(source: Path, dest: Path, **changes: torch.Tensor | None) -> Path:
    """Copy a checkpoint, replacing (tensor) or deleting (None) the named tensors."""
    shutil.copytree(source, dest)
    weights = load_file(dest / "model.safetensors")
    for key, value in changes.items():
        name = key.replace("__", ".")
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def make_synthetic_checkpoint(
    path: Path, *, n_tensors: int, numel: int, seed: int, extra_int: bool = True
) -> Path:
    """A llama-typed checkpoint of ``n_tensors`` float32 tensors (not loadable by transformers).

    Used where only the merge machinery matters (memory, throughput): ``n_tensors * numel * 4``
    bytes of weights plus an int64 tensor that must be copied, not merged.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    gen = torch.Generator().manual_seed(seed)
    weights = {
        f"model.layers.{i}.w.weight": torch.randn(numel // 256, 256, generator=gen)
        for i in range(n_tensors)
    }
    if extra_int:
        weights["model.position_ids"] = torch.arange(16)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def reference_merge(recipe: MergeRecipe) -> dict[str, torch.Tensor]:
    """Whole-model in-memory merge: load every model fully, apply the method per tensor."""
    method = get_method(recipe.method)
    template = Path(recipe.base_model or recipe.models[0].path)
    base = load_weights(Path(recipe.base_model)) if recipe.base_model else None
    models = [load_weights(Path(m.path)) for m in recipe.models]
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[recipe.dtype]  # fmt: skip
    out = {}
    for name, tensor in load_weights(template).items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        merged = method.merge_tensor(
            name,
            base[name].float() if base is not None and method.needs_base else None,
            [m[name].float() for m in models],
            recipe.params_for(name),
        )
        out[name] = merged.to(dtype or tensor.dtype)
    return out
