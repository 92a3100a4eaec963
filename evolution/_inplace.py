"""Merge in place: a resident model whose weights are overwritten by each candidate's merge.

An evaluator scores many candidates that differ only in their recipe numbers. Loading a merged
checkpoint per candidate would cost a disk write and a model load each time, so instead:

1. the model is loaded once with ``transformers`` from the recipe's template checkpoint (the
   base model, or the first model when there is none — the same template the streaming
   ``merge()`` copies), and kept resident on the evaluator's device;
2. every input checkpoint's tensors are read once (float32, on that device) and cached;
3. per candidate, each floating tensor of the template is merged with the recipe's method
   straight into the resident parameter (``MergeMethod.merge_into``: the same ``PieceMerger``
   the streaming ``merge()`` feeds, 1 Mi elements at a time on the CPU, the whole tensor on a
   GPU; tensor plan included: same keys, tied heads, shapes checked). Each merged piece is
   checked for NaN/inf and rounded to the recipe's output dtype in place. Nothing is allocated
   per candidate, so the merge runs at memory speed on memory the process already holds.
   Integer tensors keep the template's values.

The merged model is therefore bit-for-bit the one ``merge()`` would write (for the same recipe),
so the champion materialised on disk scores what its candidate scored. A non-finite merged
piece raises ``NonFiniteError`` before that candidate is scored; the resident weights are then
partly overwritten, but every floating tensor is rewritten by the next candidate.

The cache holds every input's weights in memory (three tiny models here); for large models
keep ``max_cached_inputs`` small or stream from disk with ``merge()`` instead.

Example:
    >>> resident = ResidentModel(device="cpu")
    >>> seconds = resident.apply(recipe)                                # doctest: +SKIP
    >>> task.score(resident.model, resident.tokenizer)                  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from evolution._exceptions import MergeError, NonFiniteError
from evolution._merge import _PIECE_ELEMENTS, all_finite
from evolution._merge_plan import PlanStep, check_architectures, open_inputs, plan_merge
from evolution._recipe import MergeRecipe

__all__ = ["ResidentModel"]

_CPU_PIECE = _PIECE_ELEMENTS  # elements merged at a time on the CPU, as the streaming merge


def _piece(device: torch.device) -> int | None:
    """Elements per piece: 1 Mi on the CPU (a piece's check runs while it is in the cache),
    the whole tensor elsewhere (one kernel launch per step)."""
    return _CPU_PIECE if device.type == "cpu" else None


def _finish_piece(name: str, dtype: torch.dtype, first: int, piece: torch.Tensor) -> None:
    """Round a merged piece to the recipe's ``dtype`` in place; reject it if it has NaN/inf
    (after rounding: a float32 value beyond float16's range becomes inf)."""
    if dtype != piece.dtype:
        piece.copy_(piece.to(dtype))
    if not all_finite(piece):
        bad = int((~torch.isfinite(piece)).sum())
        raise NonFiniteError(
            f"merged tensor {name!r} has {bad} NaN/inf values in elements {first} .. "
            f"{first + piece.numel()} (as {str(dtype).removeprefix('torch.')}); the candidate "
            "is rejected",
            tensor=name,
            count=bad,
        )


class ResidentModel:
    """A model kept in memory, re-merged in place for each recipe.

    Args:
        device: torch device for the model and cached tensors ("cpu", "cuda:0"); None picks
            "cuda" when available, else "cpu".
    """

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: Any = None  # the resident transformers model (eval mode)
        self.tokenizer: Any = None  # its tokenizer
        self.template: Path | None = None  # checkpoint the model was loaded from
        self._params: dict[str, torch.Tensor] = {}  # state-dict name -> live tensor
        self._tensors: dict[tuple[Path, str], torch.Tensor] = {}  # (ckpt, key) -> float32
        self._plans: dict[tuple[Any, ...], tuple[Path, list[PlanStep], list[Path | None]]] = {}
        self.load_seconds = 0.0  # time spent loading the model and input tensors so far

    # ------------------------------------------------------------------ loading

    def _plan_for(self, recipe: MergeRecipe) -> tuple[Path, list[PlanStep], list[Path | None]]:
        """(template dir, tensor plan, [base dir or None, model dirs...]) for a recipe's inputs."""
        method = recipe.merge_method
        key = (recipe.base_model, tuple(m.path for m in recipe.models), method.needs_base,
               recipe.dtype)  # fmt: skip
        if key not in self._plans:
            started = time.perf_counter()
            with ExitStack() as stack:
                base, models, template = open_inputs(recipe, stack)
                check_architectures(template, [i for i in (base, *models) if i is not None])
                merged_base = base if method.needs_base else None
                plan = plan_merge(recipe, template, merged_base, models)
                sources = [None if merged_base is None else merged_base.path]
                sources += [m.path for m in models]
                for step in plan:
                    if not step.merged:
                        continue
                    keys = ([step.base_key] if merged_base is not None else [None]) + list(
                        step.model_keys
                    )
                    for item, k in zip([merged_base, *models], keys):
                        if item is None or k is None or (item.path, k) in self._tensors:
                            continue
                        tensor = item.reader.read(k).to(self.device, torch.float32)
                        self._tensors[(item.path, k)] = tensor
                self._plans[key] = (template.path, plan, sources)
            self.load_seconds += time.perf_counter() - started
        return self._plans[key]

    def _load_model(self, template: Path) -> None:
        if self.template == template:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        self.model = None
        model = AutoModelForCausalLM.from_pretrained(template, dtype=torch.float32)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.tokenizer = AutoTokenizer.from_pretrained(template)
        self._params = dict(self.model.state_dict(keep_vars=True))
        self.template = template
        self.load_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ merging

    def apply(self, recipe: MergeRecipe) -> float:
        """Merge ``recipe`` into the resident model's weights; returns the seconds it took.

        Args:
            recipe: the candidate's recipe (absolute paths).

        Returns:
            Seconds spent merging and copying (model/tensor loading excluded: see
            ``load_seconds``).

        Raises:
            NonFiniteError: a merged tensor has NaN/inf (``tensor`` names it).
            MergeError: the inputs do not fit together, or a checkpoint tensor has no
                parameter in the loaded model.
        """
        recipe = recipe.resolve_paths(Path.cwd())
        template, plan, sources = self._plan_for(recipe)
        self._load_model(template)
        started = time.perf_counter()
        method = recipe.merge_method
        with torch.no_grad():
            for step in plan:
                if not step.merged:
                    continue
                target = self._params.get(step.name)
                if target is None:
                    raise MergeError(
                        f"checkpoint tensor {step.name!r} of {template} has no parameter of that "
                        "name in the model transformers loaded; in-place merging needs matching "
                        "names (use the streaming merge() for this checkpoint)",
                        tensor=step.name,
                        path=str(template),
                    )
                base = None if sources[0] is None or step.base_key is None else (
                    self._tensors[(sources[0], step.base_key)])  # fmt: skip
                inputs = [self._tensors[(p, k)] for p, k in zip(sources[1:], step.model_keys)
                          if p is not None]  # fmt: skip
                params = recipe.params_for(step.name)
                if target.dtype == torch.float32 and target.is_contiguous():
                    # straight into the parameter, piece by piece: no merged copy to allocate
                    check = functools.partial(_finish_piece, step.name, step.out.dtype)
                    method.merge_into(step.name, base, inputs, params, target,
                                      piece=_piece(self.device), after=check)  # fmt: skip
                else:  # a parameter the merge cannot write into: merge, then copy
                    merged = method.merge_tensor(step.name, base, inputs, params)
                    _finish_piece(step.name, step.out.dtype, 0, merged)
                    target.copy_(merged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started
