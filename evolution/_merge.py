"""Streaming merge: the inputs piece by piece, straight into the output files.

``merge(recipe, out_dir)`` checks that the inputs fit together (same architecture, every tensor
present with the same shape; ``_merge_plan``) before writing anything. Then, for each tensor of
the template (the base model, or the first model when there is no base), the recipe's method
starts a ``PieceMerger`` (``MergeMethod.start``) and the tensor goes through it in pieces of
``_PIECE_ELEMENTS`` (1 Mi) elements: first the statistics passes the method asks for (TIES
and breadcrumbs rank each task vector's magnitudes, SLERP takes the norms and the angle — only
for tensors larger than one piece), then the merge pass, which writes each merged piece into
an output buffer, casts it to the output dtype and hands it to a writer thread that rejects
NaN/inf (off the merging thread's critical path), appends it to the output safetensors file
(whose header was written first, ``_tensor_writer.ShardedWriter``) and hashes it
(``_checksum``: xxh3-128 unless ``checksum="sha256"``). Up to ``_IN_FLIGHT`` (3) written
pieces are in flight, so reading, merging and writing overlap; after a piece fails its check
the writer writes nothing more, and the merge raises that first failure.

Inputs are read through private memory maps (``SafetensorsReader.view``): a float32 input is
merged where the page cache holds it, without a copy; other dtypes are cast piece by piece
into a reusable float32 buffer. Each finished piece is released from the mapping, and the next
one prefetched. Methods run tile by tile (``merge_methods._base.tiles``), so their temporaries
stay in the CPU cache.

Memory: about one piece per input (mapped pages, or the float32 cast buffer), up to
``_IN_FLIGHT`` output pieces and the methods' per-tile temporaries — ``(inputs + 4) x 4 MiB``
for float32 whatever the model and whatever the method; a custom method that only implements
``merge_tensor`` gets whole tensors instead. ``MergeResult.bytes_read`` counts each input
tensor's bytes once (statistics passes re-read pieces from the page cache on top).

Threads: the arithmetic is memory-bound, so torch's intra-op threads buy little, and on an
oversubscribed host their OpenMP spin-waits can slow a merge several-fold. Ray workers run with
``OMP_NUM_THREADS`` = the task's ``num_cpus`` (1 by default), which suits it; elsewhere on a
shared host use ``OMP_NUM_THREADS=1`` (or ``torch.set_num_threads(1)``). The writer thread
(writing, hashing) runs beside it.

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
    >>> result.digest, result.seconds                                    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from evolution._checksum import (
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    Checksum,
    digest_file,
    manifest_digest,
    sha256_dir,
)
from evolution._exceptions import MergeError, NonFiniteError
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
from evolution.merge_methods._base import piece_length

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "RECIPE_FILE", "MergeResult", "all_finite", "merge"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # outputs above 2 GiB are sharded
RECIPE_FILE = "merge_recipe.yaml"  # the recipe, saved beside the merged weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", RECIPE_FILE}
_PIECE_ELEMENTS = 1024**2  # tensors are merged 1 Mi elements (4 MiB of float32) at a time
_IN_FLIGHT = 3  # merged pieces queued to or being written by the writer thread


class MergeResult(BaseModel):
    """What a merge produced (frozen: it travels back from Ray workers to the scheduler)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # the merged checkpoint directory
    checksum: Checksum  # digest algorithm: "xxh3_128" (default) or "sha256"
    digest: str  # digest of the weight files (manifest of ``files``; evolution._checksum)
    files: dict[str, str]  # weight file name -> its digest
    recipe: MergeRecipe  # the recipe, paths made absolute
    n_tensors: int  # tensors written
    bytes_read: int  # tensor bytes read from all inputs
    bytes_written: int  # tensor bytes written
    seconds: float  # wall time of the whole merge
    read_seconds: float  # reading input tensors and casting them to float32
    merge_seconds: float  # the method and the output cast
    write_seconds: float  # writer thread: NaN/inf check, writing, hashing (overlaps the others)

    @property
    def sha256(self) -> str:
        """The sha256 digest of the weight files (``evolution.verify`` checks it).

        ``digest`` itself for a ``checksum="sha256"`` merge; otherwise the files are read and
        hashed now (merge with ``checksum="sha256"`` to have it computed while writing).
        """
        return self.digest if self.checksum == "sha256" else sha256_dir(self.path)

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
    checksum: Checksum = DEFAULT_CHECKSUM,
) -> MergeResult:
    """Merge the recipe's models into a new checkpoint, one tensor at a time.

    Args:
        recipe: a ``MergeRecipe``, or the path of a recipe YAML/JSON file.
        out_dir: directory to create; it must not exist or be empty unless ``overwrite``.
        progress: show a tqdm progress bar over tensors.
        overwrite: replace a non-empty ``out_dir`` (only after the merge succeeded).
        max_shard_bytes: split the weights into shards of at most this many bytes.
        checksum: digest computed while writing: "xxh3_128" (fast; candidates, scratch
            merges) or "sha256" (a checkpoint whose digest is recorded and verified later:
            champions). See ``evolution._checksum``.

    Returns:
        ``MergeResult``: path, digest of the weight files, byte counts and timings.

    Raises:
        MergeError: an input path is missing or is not a checkpoint, the inputs have different
            architectures, a tensor is missing from a model or has another shape (``tensor``
            names it), or ``out_dir`` is not empty / is an input.
        NonFiniteError: a merged tensor has NaN/inf (``tensor`` names it); nothing is written.
        UnknownNameError, pydantic.ValidationError: ``recipe`` is a file with an invalid recipe.
        ValueError: ``checksum`` is not one of "xxh3_128", "sha256".

    Example:
        >>> result = merge(MergeRecipe.load("ties.yaml"), "/merges/c17")    # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(result.path)              # doctest: +SKIP
    """
    started = time.perf_counter()
    if checksum not in CHECKSUMS:
        raise ValueError(f"unknown checksum {checksum!r}; use one of {list(CHECKSUMS)}")
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
            writer = ShardedWriter(staging, [s.out for s in plan], max_shard_bytes, checksum)
            try:
                loop = _MergeLoop(recipe, template, base, models, plan)
                loop.run(writer, progress)
            finally:
                writer.abort()  # closes a half-written file after an error; no-op otherwise
            writer.close()
            _copy_support_files(template.path, staging, recipe.dtype)
            recipe.save(staging / RECIPE_FILE)
            files = dict(writer.digests)
            if (staging / INDEX_FILE).is_file():
                files[INDEX_FILE] = digest_file(staging / INDEX_FILE, checksum)
            _publish(staging, out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return MergeResult(
        path=str(out),
        checksum=checksum,
        digest=manifest_digest(files, checksum),
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


class _MergeLoop:
    """Feed each tensor's pieces through its ``PieceMerger``; a writer thread writes them.

    Inputs are flat views of the memory-mapped files (float32 ones used as they are, others
    cast into one reusable float32 buffer per input). Each merged piece goes into one of
    ``_IN_FLIGHT`` output buffers used in turn, so the writer thread can still be writing the
    previous two while this one is merged; a buffer is reused only once its write finished.
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
        self._casts: dict[int, torch.Tensor] = {}  # input slot -> float32 cast buffer
        self._scratch = torch.empty(0)  # float32 result of a piece with another output dtype
        self._out: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8)] * _IN_FLIGHT
        self._pending: list[Future[float] | None] = [None] * _IN_FLIGHT
        self._slot = 0
        self._failed = False  # a piece failed its check or its write: the writer stops

    def _inputs(self, step: PlanStep) -> list[tuple[int, MergeInput, str]]:
        """(slot, input, key) for each input of ``step``: slot 0 the base, then the models."""
        items = []
        if self.base is not None and step.base_key is not None:
            items.append((0, self.base, step.base_key))
        items += [(i + 1, m, k) for i, (m, k) in enumerate(zip(self.models, step.model_keys))]
        return items

    def _load(
        self, inputs: list[tuple[int, MergeInput, str]], first: int, count: int, piece: int
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Elements ``first .. first + count`` of every input as flat float32 tensors."""
        started = time.perf_counter()
        base: torch.Tensor | None = None
        tensors = []
        for slot, item, key in inputs:
            whole = item.reader.view(key, check=first == 0)  # the size check once per tensor
            view = whole[first : first + count]
            rest = whole.numel() - first - count
            if rest > 0:  # not the last piece: have the next one read ahead
                item.reader.prefetch(key, first + count, min(piece, rest))
            if view.dtype != torch.float32:
                buffer = self._casts.get(slot)
                if buffer is None or buffer.numel() < count:
                    buffer = self._casts[slot] = torch.empty(max(count, piece))
                view = buffer[:count].copy_(view)
            if slot == 0:
                base = view
            else:
                tensors.append(view)
        self.read_s += time.perf_counter() - started
        return base, tensors

    def _release(self, inputs: list[tuple[int, MergeInput, str]], first: int, count: int) -> None:
        for _, item, key in inputs:
            item.reader.release(key, first, count)

    def _next_buffer(self, nbytes: int) -> torch.Tensor:
        """The next output buffer (uint8, >= ``nbytes``), once its previous write is done."""
        self._slot = (self._slot + 1) % _IN_FLIGHT
        pending = self._pending[self._slot]
        if pending is not None:
            self.write_s += pending.result()
            self._pending[self._slot] = None
        if self._out[self._slot].numel() < nbytes:
            self._out[self._slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._out[self._slot][:nbytes]

    def run(self, writer: ShardedWriter, progress: bool) -> None:
        bar = tqdm(total=len(self.plan), unit="tensor", desc=f"merge {self.recipe.method}",
                   disable=not progress)  # fmt: skip
        with bar, ThreadPoolExecutor(1, thread_name_prefix="hive-merge-writer") as pool:
            try:
                for step in self.plan:
                    if step.merged:
                        self._merge_step(step, writer, pool)
                    else:  # integer/bool tensors: copied from the template as they are
                        copy = self.template.reader.read(step.name)
                        self.bytes_read += copy.nbytes
                        self._submit(pool, writer, step.name, copy)
                    bar.update()
                for k in range(1, _IN_FLIGHT + 1):  # oldest first: its error is the first
                    i = (self._slot + k) % _IN_FLIGHT
                    pending = self._pending[i]
                    if pending is not None:
                        self.write_s += pending.result()
                        self._pending[i] = None
            finally:  # after an error, let the writer finish before the files are closed
                for pending in self._pending:
                    if pending is not None:
                        pending.exception()

    def _submit(
        self, pool: ThreadPoolExecutor, writer: ShardedWriter, name: str, piece: torch.Tensor
    ) -> None:
        self._slot = (self._slot + 1) % _IN_FLIGHT
        pending = self._pending[self._slot]
        if pending is not None:
            self.write_s += pending.result()
        self._pending[self._slot] = pool.submit(self._write, writer, name, piece, None)

    def _merge_step(self, step: PlanStep, writer: ShardedWriter, pool: ThreadPoolExecutor) -> None:
        numel = math.prod(step.out.shape)
        params = self.recipe.params_for(step.name)
        merger = self.method.start(step.name, step.out.shape, _PIECE_ELEMENTS, params)
        piece = piece_length(merger, numel, _PIECE_ELEMENTS)
        inputs = self._inputs(step)
        starts = range(0, numel, piece) if numel else [0]
        for pass_index in range(merger.passes):
            for first in starts:
                count = min(piece, numel - first)
                base, tensors = self._load(inputs, first, count, piece)
                start = time.perf_counter()
                merger.observe(pass_index, first, base, tensors)
                self.merge_s += time.perf_counter() - start
                self._release(inputs, first, count)
            merger.end_pass(pass_index)
        dtype = step.out.dtype
        for first in starts:
            count = min(piece, numel - first)
            base, tensors = self._load(inputs, first, count, piece)
            self.bytes_read += sum(
                count * item.reader.entries[key].dtype.itemsize for _, item, key in inputs
            )
            start = time.perf_counter()
            out = self._next_buffer(count * dtype.itemsize).view(dtype)
            if dtype == torch.float32:
                merger.merge(first, base, tensors, out)
            else:  # merge in float32, cast into the output buffer
                if self._scratch.numel() < count:
                    self._scratch = torch.empty(piece)
                merger.merge(first, base, tensors, self._scratch[:count])
                out.copy_(self._scratch[:count])
            self.merge_s += time.perf_counter() - start
            self._release(inputs, first, count)
            check = functools.partial(_check_finite, step, out, inputs, first, count)
            self._pending[self._slot] = pool.submit(self._write, writer, step.name, out, check)

    def _write(
        self,
        writer: ShardedWriter,
        name: str,
        piece: torch.Tensor,
        check: Callable[[], None] | None,
    ) -> float:
        """Writer thread: ``check`` the piece (NaN/inf: off the merging thread's critical
        path), then append it; nothing more is written once a piece failed."""
        if self._failed:
            return 0.0
        start = time.perf_counter()
        try:
            if check is not None:
                check()
            writer.append(name, piece)
        except BaseException:
            self._failed = True
            raise
        return time.perf_counter() - start


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN/inf, in one vectorised read pass and no mask.

    A NaN or inf in the tensor makes its sum NaN or inf, so a finite sum proves every element
    finite; a non-finite sum (which a float32 overflow of large finite values also gives) is
    confirmed element by element.
    """
    if tensor.numel() == 0 or math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_finite(
    step: PlanStep,
    result: torch.Tensor,
    inputs: list[tuple[int, MergeInput, str]],
    first: int,
    count: int,
) -> None:
    """Raise ``NonFiniteError`` when ``result`` has NaN/inf (one min/max pass: NaN propagates).

    The error names the inputs whose elements ``first .. first + count`` already hold NaN/inf
    (read again from their files: the merge's own buffers may hold the next piece by now).
    """
    if all_finite(result):
        return
    bad = int((~torch.isfinite(result)).sum())
    culprits = [
        f"{item.label} {item.path}"
        for _, item, key in inputs
        if not bool(torch.isfinite(item.reader.view(key, check=False)[first : first + count]).all())
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
