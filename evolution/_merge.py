"""Streaming merge: one tensor at a time from every input, straight into the output files.

``merge(recipe, out_dir)`` checks that the inputs fit together (same architecture, every tensor
present with the same shape; ``_merge_plan``) before writing anything. Then, for each tensor of
the template (the base model, or the first model when there is no base), it reads that tensor
from each input, merges it with the recipe's method in float32, casts it to the output dtype,
rejects NaN/inf, and hands it to a writer thread that appends it to the output safetensors file
(whose header was written first, ``_tensor_writer.ShardedWriter``) and hashes it, while the main
thread goes on with the next tensor.

Memory: each input is read into one reusable float32 buffer (bfloat16/float16 inputs are cast
through a shared 16 MiB staging buffer); the method allocates its float32 temporaries (one
result for linear/task arithmetic, ~4 plus one per model for TIES/DARE-TIES); the piece being
written is held once more by the writer thread. Elementwise methods (linear, task_arithmetic;
``MergeMethod.elementwise``) get large tensors in runs of 4 Mi elements, so they hold about
``(inputs + 3) x 16 MiB`` whatever the model. The others need a whole tensor at once (a top-k
threshold, a norm, a seeded mask), so their peak is a small multiple of the largest tensor
(usually the embedding) per input — still never a whole model. Reusing the buffers matters for
speed too: fresh pages for each large tensor cost about as much as the arithmetic.

Threads: the arithmetic is memory-bound, so torch's intra-op threads buy little, and on an
oversubscribed host their OpenMP spin-waits can slow a merge several-fold. Ray workers run with
``OMP_NUM_THREADS`` = the task's ``num_cpus`` (1 by default), which suits it; elsewhere on a
shared host use ``OMP_NUM_THREADS=1`` (or ``torch.set_num_threads(1)``).

The output is staged in a hidden sibling directory and renamed into place at the end, so
``out_dir`` either holds a complete checkpoint or nothing; a failed merge (``NonFiniteError``
included) leaves no partial files behind. It gets the weights (``model.safetensors``, or shards
of at most ``max_shard_bytes`` with ``model.safetensors.index.json``), every non-weight file of
the template (``config.json`` with ``dtype`` updated, ``generation_config.json``, tokenizer
files, ...) and the recipe with absolute paths (``merge_recipe.yaml``).

Example:
    >>> from evolution._merge import merge
    >>> from evolution._recipe import MergeRecipe
    >>> recipe = MergeRecipe.load("recipes/ties.yaml")                   # doctest: +SKIP
    >>> result = merge(recipe, "/merges/c17")                            # doctest: +SKIP
    >>> result.sha256, result.seconds                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from evolution._checksum import manifest_digest, sha256_file
from evolution._exceptions import MergeError
from evolution._merge_plan import (
    MergeInput,
    PlanStep,
    check_architectures,
    check_output,
    open_inputs,
    plan_merge,
)
from evolution._recipe import MergeRecipe
from evolution._tensor_reader import INDEX_FILE
from evolution._tensor_writer import ShardedWriter

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "RECIPE_FILE", "MergeResult", "NonFiniteError", "merge"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # outputs above 2 GiB are sharded
RECIPE_FILE = "merge_recipe.yaml"  # the recipe, saved beside the merged weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", RECIPE_FILE}
_STAGING_BYTES = 16 * 1024**2  # bytes read at a time when an input is cast to float32
_PIECE_ELEMENTS = 4 * 1024**2  # elementwise methods merge large tensors 4 Mi elements at a time


class NonFiniteError(MergeError):
    """A merged tensor holds NaN or inf; ``tensor`` names it. Reject the candidate and go on."""


class MergeResult(BaseModel):
    """What a merge produced (frozen: it travels back from Ray workers to the scheduler)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # the merged checkpoint directory
    sha256: str  # digest of the weight files (evolution._checksum.sha256_dir)
    files: dict[str, str]  # weight file name -> its sha256
    recipe: MergeRecipe  # the recipe, paths made absolute
    n_tensors: int  # tensors written
    bytes_read: int  # tensor bytes read from all inputs
    bytes_written: int  # tensor bytes written
    seconds: float  # wall time of the whole merge
    read_seconds: float  # reading input tensors and casting them to float32
    merge_seconds: float  # the method, the output cast and the NaN/inf check
    write_seconds: float  # writer thread: writing and hashing (overlaps the other two)

    @property
    def throughput(self) -> float:
        """(bytes read + bytes written) per second of wall time."""
        return (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9)


def merge(
    recipe: MergeRecipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> MergeResult:
    """Merge the recipe's models into a new checkpoint, one tensor at a time.

    Args:
        recipe: a ``MergeRecipe``, or the path of a recipe YAML/JSON file.
        out_dir: directory to create; it must not exist or be empty unless ``overwrite``.
        progress: show a tqdm progress bar over tensors.
        overwrite: replace a non-empty ``out_dir`` (only after the merge succeeded).
        max_shard_bytes: split the weights into shards of at most this many bytes.

    Returns:
        ``MergeResult``: path, sha256 of the weight files, byte counts and timings.

    Raises:
        MergeError: an input path is missing or is not a checkpoint, the inputs have different
            architectures, a tensor is missing from a model or has another shape (``tensor``
            names it), or ``out_dir`` is not empty / is an input.
        NonFiniteError: a merged tensor has NaN/inf (``tensor`` names it); nothing is written.
        UnknownNameError, pydantic.ValidationError: ``recipe`` is a file with an invalid recipe.

    Example:
        >>> result = merge(MergeRecipe.load("ties.yaml"), "/merges/c17")    # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(result.path)              # doctest: +SKIP
    """
    started = time.perf_counter()
    if not isinstance(recipe, MergeRecipe):
        recipe = MergeRecipe.load(recipe)
    recipe = recipe.resolve_paths(Path.cwd())
    out = Path(out_dir).expanduser().resolve()
    with ExitStack() as stack:
        base, models, template = open_inputs(recipe, stack)
        check_output(out, [base.path] if base else [], [m.path for m in models], overwrite)
        check_architectures(template, [i for i in (base, *models) if i is not None])
        if not recipe.merge_method.needs_base:
            base = None  # the base is only the template: its tensors are not read
        plan = plan_merge(recipe, template, base, models)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            writer = ShardedWriter(staging, [s.out for s in plan], max_shard_bytes)
            try:
                loop = _MergeLoop(recipe, template, base, models, plan)
                loop.run(writer, progress)
            finally:
                writer.abort()  # closes a half-written file after an error; no-op otherwise
            writer.close()
            _copy_support_files(template.path, staging, recipe.dtype)
            recipe.save(staging / RECIPE_FILE)
            files = dict(writer.sha256)
            if (staging / INDEX_FILE).is_file():
                files[INDEX_FILE] = sha256_file(staging / INDEX_FILE)
            _publish(staging, out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return MergeResult(
        path=str(out),
        sha256=manifest_digest(files),
        files=files,
        recipe=recipe,
        n_tensors=len(plan),
        bytes_read=loop.bytes_read,
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - started,
        read_seconds=loop.read_s,
        merge_seconds=loop.merge_s,
        write_seconds=loop.write_s,
    )


# ---------------------------------------------------------------------------- the merge loop


@dataclass
class _Loaded:
    """One piece of one step's inputs as float32 (views of the reusable buffers)."""

    base: torch.Tensor | None  # the base tensor, when the method takes one
    tensors: list[torch.Tensor]  # one per model
    copy: torch.Tensor | None = None  # a non-float tensor copied from the template instead


class _MergeLoop:
    """Read and merge on the calling thread while a writer thread writes the previous piece.

    A piece is a whole tensor, or — for elementwise methods (``MergeMethod.elementwise``) and
    tensors above ``_PIECE_ELEMENTS`` — a run of consecutive elements of the flattened tensor,
    so linear/task-arithmetic merges hold a few MiB per input whatever the tensor sizes.

    Each input has one reusable float32 buffer. The writer gets either the method's fresh result
    or one of two cast buffers used on alternate pieces. (Reading the next piece on a third
    thread as well measured no faster on a shared 2-core host and doubles the input buffers.)
    """

    def __init__(
        self,
        recipe: MergeRecipe,
        template: MergeInput,
        base: MergeInput | None,
        models: list[MergeInput],
        plan: list[PlanStep],
    ) -> None:
        self.recipe, self.template, self.base, self.models, self.plan = (
            recipe, template, base, models, plan,
        )  # fmt: skip
        self.method = recipe.merge_method
        self.bytes_read = 0
        self.read_s = self.merge_s = self.write_s = 0.0
        inputs = [(self.base, [s.base_key for s in plan if s.merged])]
        inputs += [(m, [s.model_keys[i] for s in plan if s.merged]) for i, m in enumerate(models)]
        self._sizes: list[int] = []  # per slot (0 = base): elements of its largest piece
        for item, keys in inputs:
            entries = [] if item is None else [item.reader.entries[k] for k in keys if k]
            self._sizes.append(max((self._piece(math.prod(e.shape)) for e in entries), default=0))
        self._buffers: dict[int, torch.Tensor] = {}  # slot -> float32 buffer, made on first use
        self._staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)  # for casting reads

    def _piece(self, numel: int) -> int:
        """Elements per piece of a tensor of ``numel`` elements."""
        return min(numel, _PIECE_ELEMENTS) if self.method.elementwise else numel

    def _read(self, slot: int, item: MergeInput, key: str, first: int, count: int) -> torch.Tensor:
        """Elements ``first .. first + count`` of input tensor ``key`` as float32."""
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = self._buffers[slot] = torch.empty(self._sizes[slot])
        self.bytes_read += count * item.reader.entries[key].dtype.itemsize
        return item.reader.read_into(key, buffer[:count], self._staging, first=first)

    def _load(self, step: PlanStep, first: int, count: int) -> _Loaded:
        """Read one piece of everything ``step`` needs."""
        start = time.perf_counter()
        if not step.merged:  # integer/bool tensors: copied from the template as they are
            copy = self.template.reader.read(step.name)
            self.bytes_read += copy.nbytes
            loaded = _Loaded(None, [], copy)
        else:
            base_t = None
            if self.base is not None and step.base_key is not None:
                base_t = self._read(0, self.base, step.base_key, first, count)
            tensors = [
                self._read(i + 1, item, key, first, count)
                for i, (item, key) in enumerate(zip(self.models, step.model_keys))
            ]
            loaded = _Loaded(base_t, tensors)
        self.read_s += time.perf_counter() - start
        return loaded

    def run(self, writer: ShardedWriter, progress: bool) -> None:
        out_buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * 2
        written: Future[float] | None = None
        pieces = 0
        bar = tqdm(total=len(self.plan), unit="tensor", desc=f"merge {self.recipe.method}",
                   disable=not progress)  # fmt: skip
        with bar, ThreadPoolExecutor(1, thread_name_prefix="hive-merge-writer") as pool:
            for step in self.plan:
                numel = math.prod(step.out.shape)
                size = self._piece(numel) if step.merged else numel
                for first in range(0, numel, size) if numel else [0]:
                    loaded = self._load(step, first, min(size, numel - first))
                    start = time.perf_counter()
                    if loaded.copy is not None:
                        result = loaded.copy
                    else:
                        params = self.recipe.params_for(step.name)
                        result = self.method.merge_tensor(
                            step.name, loaded.base, loaded.tensors, params
                        )
                        if step.out.dtype == torch.float32:
                            result = self._owned(result, [loaded.base, *loaded.tensors])
                        else:  # cast into a reusable buffer; the writer may hold the other one
                            slot = pieces % 2
                            out_buffers[slot] = _cast(result, step.out.dtype, out_buffers[slot])
                            result = out_buffers[slot][: result.numel() * step.out.dtype.itemsize]
                            result = result.view(step.out.dtype).view(loaded.tensors[0].shape)
                        _check_finite(step, result, self.base, loaded, self.models)
                    del loaded
                    self.merge_s += time.perf_counter() - start
                    if written is not None:
                        self.write_s += written.result()  # at most one piece in flight
                    written = pool.submit(_timed_append, writer, step.name, result)
                    del result
                    pieces += 1
                bar.update()
            if written is not None:
                self.write_s += written.result()

    def _owned(self, result: torch.Tensor, inputs: list[torch.Tensor | None]) -> torch.Tensor:
        """``result``, copied if it shares memory with a reusable input buffer.

        The next tensor is read into those buffers while the writer thread still holds this
        one, so a method that returns (a view of) an input must not be written from there.
        """
        pointer = result.untyped_storage().data_ptr()
        if any(t is not None and t.untyped_storage().data_ptr() == pointer for t in inputs):
            return result.clone()
        return result


def _cast(result: torch.Tensor, dtype: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
    """Cast ``result`` into (a grown) ``buffer``; returns the buffer (uint8, >= the bytes)."""
    nbytes = result.numel() * dtype.itemsize
    if buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    buffer[:nbytes].view(dtype).view(result.shape).copy_(result)
    return buffer


def _timed_append(writer: ShardedWriter, name: str, piece: torch.Tensor) -> float:
    start = time.perf_counter()
    writer.append(name, piece)
    return time.perf_counter() - start


def _check_finite(
    step: PlanStep,
    result: torch.Tensor,
    base: MergeInput | None,
    loaded: _Loaded,
    models: list[MergeInput],
) -> None:
    """Raise ``NonFiniteError`` when ``result`` has NaN/inf (one min/max pass: NaN propagates)."""
    if result.numel() == 0:
        return
    low, high = torch.aminmax(result)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    bad = int((~torch.isfinite(result)).sum())
    inputs = [(base, loaded.base)] if base is not None else []
    inputs += list(zip(models, loaded.tensors))
    culprits = [
        f"{item.label} {item.path}"
        for item, tensor in inputs
        if item is not None and tensor is not None and not bool(torch.isfinite(tensor).all())
    ]
    if culprits:
        hint = f"the input(s) {', '.join(culprits)} already hold NaN/inf in this tensor"
    elif step.out.dtype == torch.float16:
        hint = "the merged values overflow float16: set `dtype: bfloat16` or lower weights/lambda"
    else:
        hint = "lower the weights or lambda of the recipe"
    raise NonFiniteError(
        f"merged tensor {step.name!r} has {bad} NaN/inf values (in {result.numel()} checked); the "
        f"candidate is rejected and nothing was written ({hint})",
        tensor=step.name,
        count=bad,
    )


# ---------------------------------------------------------------------------- output files


def _copy_support_files(source: Path, dest: Path, dtype: str | None) -> None:
    """Copy config, generation config, tokenizer and other non-weight files of the template."""
    for item in sorted(source.iterdir()):
        if (
            not item.is_file()
            or item.name.endswith(_WEIGHT_SUFFIXES)
            or item.name in _NOT_COPIED
            or item.name.startswith(".")
        ):
            continue
        if item.name == "config.json" and dtype is not None:
            config = json.loads(item.read_text())
            config["dtype"] = dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
            (dest / item.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(item, dest / item.name)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished staging directory to ``out`` (replacing it when ``overwrite``)."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        else:  # someone filled it while we merged
            raise MergeError(
                f"output directory {out} was filled during the merge; nothing replaced, choose "
                "another directory",
                path=str(out),
                tensor=None,
            )
    os.rename(staging, out)
