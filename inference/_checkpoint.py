"""A local Hugging Face checkpoint directory, indexed without loading its tensors.

``Checkpoint.open(path)`` reads ``config.json`` and the safetensors headers (one file, or shards
listed in ``model.safetensors.index.json``) and answers what the planner and the stages need:
the layer count, the architecture family, how many bytes each layer/embedding/head takes, and
``read(names)`` for exactly the tensors one stage holds.

Example:
    >>> ckpt = Checkpoint.open("/models/smollm2")                        # doctest: +SKIP
    >>> ckpt.arch, ckpt.num_layers, ckpt.param_bytes_per_layer()[0]      # doctest: +SKIP
    ('llama', 30, 14159616)
    >>> ckpt.read(["model.norm.weight"])["model.norm.weight"].shape       # doctest: +SKIP
    torch.Size([576])
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference._arch import SUPPORTED, ArchSpec, architecture_of
from inference._exceptions import CheckpointError
from inference._gguf import convert_gguf, smollm2_checkpoint  # model I/O: GGUF -> safetensors

__all__ = ["Checkpoint", "TensorInfo", "convert_gguf", "smollm2_checkpoint"]

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024**2  # a larger safetensors header means a corrupt file
_CONVERT_HINT = (
    "convert it with inference.convert_gguf(gguf_file, out_dir) for a .gguf file, or save it with "
    "model.save_pretrained(out_dir, safe_serialization=True) (transformers 5 always writes "
    "safetensors: plain save_pretrained(out_dir))"
)
# safetensors dtype code -> bytes per element
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (nothing loaded)."""

    name: str  # key in the safetensors file ("model.layers.0.mlp.up_proj.weight")
    file: str  # file name inside the checkpoint directory
    dtype: str  # safetensors dtype code: "F32", "BF16", ...
    shape: tuple[int, ...]  # tensor shape

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes in the stored dtype, or once cast to ``dtype``."""
        size = _DTYPE_BYTES.get(self.dtype, 4) if dtype is None else dtype.itemsize
        return self.numel * size


def _read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    try:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            header: dict[str, Any] = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"cannot read the safetensors header of {file}: {exc}; the file is truncated or not "
            "safetensors, re-download or re-save the checkpoint",
            path=str(file),
        ) from exc
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """A checkpoint directory: config, architecture and a tensor index (no tensors loaded).

    Attributes:
        path: the directory.
        config: its ``transformers.PretrainedConfig``.
        architecture: the transformers class name ("LlamaForCausalLM", "GPT2LMHeadModel", ...).
        spec: where that architecture keeps its modules (``ArchSpec``).
        tensors: checkpoint key -> ``TensorInfo``.
    """

    def __init__(self, path: Path, config: Any, architecture: str, tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.architecture = architecture
        self.spec: ArchSpec = SUPPORTED[architecture]
        self.tensors: Mapping[str, TensorInfo] = tensors

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Index a local HF checkpoint directory.

        Args:
            path: directory holding ``config.json`` and ``model.safetensors`` (or shards with
                ``model.safetensors.index.json``).

        Returns:
            The indexed ``Checkpoint``.

        Raises:
            CheckpointError: the directory or its config is missing or unreadable, the
                architecture is not supported (the message lists the supported ones), or there
                are no safetensors weights (the message says how to convert).

        Example:
            >>> Checkpoint.open("/models/tiny-llama").arch                   # doctest: +SKIP
            'llama'
        """
        from transformers import AutoConfig

        root = Path(path).expanduser()
        if not root.is_dir():
            raise CheckpointError(
                f"checkpoint directory {root} does not exist (or is not a directory); pass the "
                "directory that holds config.json and model.safetensors",
                path=str(root),
            )
        if not (root / "config.json").is_file():
            raise CheckpointError(
                f"no config.json in {root}; a checkpoint directory needs the model config "
                "(save it with model.save_pretrained(dir) or config.save_pretrained(dir))",
                path=str(root),
            )
        try:
            config = AutoConfig.from_pretrained(root)
        except Exception as exc:  # transformers raises ValueError/OSError/KeyError here
            raise CheckpointError(
                f"cannot read {root / 'config.json'}: {exc}; fix the file or re-save it with "
                "config.save_pretrained(dir)",
                path=str(root),
            ) from exc
        architecture = architecture_of(config)
        if architecture is None:
            named = getattr(config, "architectures", None) or [config.model_type]
            raise CheckpointError(
                f"unsupported architecture {', '.join(map(str, named))} in {root}; supported: "
                f"{', '.join(sorted(SUPPORTED))}",
                path=str(root),
                architecture=str(named[0]),
            )
        return cls(root, config, architecture, cls._index(root))

    @staticmethod
    def _index(root: Path) -> dict[str, TensorInfo]:
        """Tensor key -> TensorInfo from the safetensors headers of ``root``."""
        if (root / _INDEX_FILE).is_file():
            try:
                index = json.loads((root / _INDEX_FILE).read_text())
                weight_map: dict[str, str] = index["weight_map"]  # tensor key -> shard file
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"cannot read {root / _INDEX_FILE}: {exc}; re-save the checkpoint",
                    path=str(root),
                ) from exc
            files = sorted(set(weight_map.values()))
        elif (root / _SINGLE_FILE).is_file():
            files = [_SINGLE_FILE]
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in root.iterdir() if p.suffix in {".gguf", ".bin", ".pt"})
            extra = f" (found {', '.join(found)})" if found else ""
            raise CheckpointError(
                f"no safetensors weights in {root}{extra}; {_CONVERT_HINT}", path=str(root)
            )
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = root / name
            if not file.is_file():
                raise CheckpointError(
                    f"{_INDEX_FILE} in {root} lists {name}, which is missing; re-download or "
                    "re-save the checkpoint",
                    path=str(file),
                )
            for key, meta in _read_header(file).items():
                tensors[key] = TensorInfo(key, name, str(meta["dtype"]), tuple(meta["shape"]))
        return tensors

    # ---------------------------------------------------------------- model facts

    @property
    def arch(self) -> str:
        """Normalized family: "llama" (Llama, Mistral, Qwen2) or "gpt2"."""
        return self.spec.family

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states passed between stages."""
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Number of logits per token."""
        return int(self.config.vocab_size)

    @property
    def tied_embeddings(self) -> bool:
        """Whether the LM head reuses the token embedding matrix."""
        return bool(self.config.get_text_config(decoder=True).tie_word_embeddings)

    def resolve(self, name: str) -> str:
        """The checkpoint key holding full-model parameter ``name``.

        Tries ``name`` itself, then without the base-model prefix (old GPT-2 checkpoints store
        ``h.0.attn.c_attn.weight``); a tied LM head resolves to the token embedding.

        Raises:
            CheckpointError: no such tensor; the message names it.
        """
        if name == self.spec.head_weight and self.tied_embeddings:
            name = self.spec.embedding_names()[0]
        for key in (name, name.removeprefix(self.spec.base + ".")):
            if key in self.tensors:
                return key
        raise CheckpointError(
            f"tensor {name!r} is missing from the checkpoint in {self.path}; the files are "
            "incomplete or belong to another model — re-download or re-save it",
            path=str(self.path),
            tensor=name,
        )

    def layer_tensor_names(self, index: int) -> list[str]:
        """Checkpoint keys of decoder layer ``index``."""
        full = self.spec.layer_prefix(index)
        short = full.removeprefix(self.spec.base + ".")
        return [k for k in self.tensors if k.startswith((full, short))]

    def embedding_tensor_names(self) -> list[str]:
        """Checkpoint keys the first stage holds (token and position embeddings)."""
        return [self.resolve(n) for n in self.spec.embedding_names()]

    def head_tensor_names(self) -> list[str]:
        """Checkpoint keys the last stage holds: final norm and LM head (the embedding if tied)."""
        norm = f"{self.spec.base}.{self.spec.norm}."
        names = [k for k in self.tensors if k.startswith((norm, norm.split(".", 1)[1]))]
        return [*names, self.resolve(self.spec.head_weight)]

    def tensor_bytes(self, names: Iterable[str], dtype: torch.dtype | None = None) -> int:
        """Total bytes of checkpoint tensors ``names`` (stored dtype, or cast to ``dtype``)."""
        return sum(self.tensors[n].nbytes(dtype) for n in names)

    def param_bytes_per_layer(self, dtype: torch.dtype | None = None) -> list[int]:
        """Bytes of each decoder layer's tensors, in the stored dtype or cast to ``dtype``."""
        return [
            self.tensor_bytes(self.layer_tensor_names(i), dtype) for i in range(self.num_layers)
        ]

    @property
    def embedding_bytes(self) -> int:
        """Stored bytes of the input embeddings (held by the first stage)."""
        return self.tensor_bytes(self.embedding_tensor_names())

    @property
    def head_bytes(self) -> int:
        """Stored bytes of final norm + LM head (held by the last stage; the embedding if tied)."""
        return self.tensor_bytes(self.head_tensor_names())

    # ---------------------------------------------------------------- reading

    def read(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Load only the tensors ``names`` (checkpoint keys) from disk.

        Args:
            names: checkpoint keys (see ``tensors``, ``resolve``).
            dtype: cast floating-point tensors to this dtype; None keeps the stored dtype.
            device: where ``safe_open`` materializes them.

        Returns:
            key -> tensor, one entry per distinct name.

        Raises:
            CheckpointError: a name is not in the checkpoint (the message names it).

        Example:
            >>> ckpt.read(["model.norm.weight"], dtype=torch.float32)         # doctest: +SKIP
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in dict.fromkeys(names):
            if name not in self.tensors:
                raise CheckpointError(
                    f"tensor {name!r} is missing from the checkpoint in {self.path}",
                    path=str(self.path),
                    tensor=name,
                )
            by_file[self.tensors[name].file].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.path / file), framework="pt", device=str(device)) as fh:
                for key in keys:
                    tensor = fh.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[key] = tensor
        return out

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, architecture={self.architecture}, "
            f"layers={self.num_layers}, tensors={len(self.tensors)})"
        )
