"""Wire messages of the hive protocols: frozen pydantic models, validated on arrival.

Every frame payload of ``/hive/rpc/1.0.0`` is one JSON envelope (:data:`RpcEnvelope`);
the control frames of ``/hive/tensors/1.3.0`` are :class:`TensorHeader`,
:class:`TransferResume`, :class:`ChunkAck` and :class:`TransferDone`. Unknown fields are
refused (``extra="forbid"``) so a newer peer sending something this version does not
understand fails loudly, not silently.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter

__all__ = [
    "ChunkAck",
    "RpcEnvelope",
    "RpcError",
    "RpcErrorBody",
    "RpcReply",
    "RpcRequest",
    "RpcResponse",
    "TensorControl",
    "TensorHeader",
    "TensorInfo",
    "TransferDone",
    "TransferResume",
    "parse_control",
    "parse_header",
    "parse_reply",
    "parse_request",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
Method = Annotated[str, Field(min_length=1, max_length=256)]
RequestId = Annotated[int, Field(ge=0, lt=2**63)]


class RpcRequest(BaseModel):
    """A call: ``method`` with JSON ``params``; ``timeout`` is the caller's budget (s)."""

    model_config = _FROZEN
    kind: Literal["request"] = "request"
    id: RequestId
    method: Method
    params: JsonValue = None
    timeout: Annotated[float, Field(gt=0)] | None = None


class RpcResponse(BaseModel):
    """The handler's JSON result for request ``id``."""

    model_config = _FROZEN
    kind: Literal["response"] = "response"
    id: RequestId
    result: JsonValue = None


class RpcErrorBody(BaseModel):
    """What failed remotely: the exception type's name and its message."""

    model_config = _FROZEN
    type: Annotated[str, Field(max_length=256)]
    message: Annotated[str, Field(max_length=65536)]


class RpcError(BaseModel):
    """The handler for request ``id`` failed (or there was none)."""

    model_config = _FROZEN
    kind: Literal["error"] = "error"
    id: RequestId
    error: RpcErrorBody


RpcReply = Annotated[RpcResponse | RpcError, Field(discriminator="kind")]
RpcEnvelope = Annotated[RpcRequest | RpcResponse | RpcError, Field(discriminator="kind")]
_REQUEST = TypeAdapter(RpcRequest)
_REPLY: TypeAdapter[RpcResponse | RpcError] = TypeAdapter(RpcReply)


def parse_request(raw: bytes) -> RpcRequest:
    """Validate a request frame (raises ``pydantic.ValidationError``)."""
    return _REQUEST.validate_json(raw)


def parse_reply(raw: bytes) -> RpcResponse | RpcError:
    """Validate a reply frame (raises ``pydantic.ValidationError``)."""
    return _REPLY.validate_json(raw)


DType = Literal["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64",
                "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]


class TensorInfo(BaseModel):
    """One tensor of a transfer, as the safetensors header describes it."""

    model_config = _FROZEN
    name: Annotated[str, Field(min_length=1, max_length=1024)]
    dtype: DType
    shape: tuple[Annotated[int, Field(ge=0)], ...]


class TensorHeader(BaseModel):
    """First frame of a tensor transfer: what follows and how it is cut.

    ``size`` bytes of safetensors data follow in ``chunks`` chunks of ``chunk_size`` bytes
    (the last may be shorter); ``xxh3`` (hex XXH3-128 digest) covers all of it - against
    reassembly and resume mistakes, not attackers: every chunk is already authenticated
    (Noise, or the bulk channel's ChaCha20-Poly1305 records).
    ``attempt`` > 0 marks a resumed transfer (same ``transfer_id`` after the link dropped):
    the receiver answers with :class:`TransferResume` before any chunk is sent.
    """

    model_config = _FROZEN
    kind: Literal["header"] = "header"
    transfer_id: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(max_length=1024)] = ""
    size: Annotated[int, Field(ge=0)]
    chunk_size: Annotated[int, Field(ge=1)]
    chunks: Annotated[int, Field(ge=0)]
    xxh3: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    tensors: tuple[TensorInfo, ...] = ()
    metadata: dict[str, str] = Field(default_factory=dict)
    attempt: Annotated[int, Field(ge=0, le=1000)] = 0


ChunkRange = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]


class TransferResume(BaseModel):
    """Receiver -> sender, first answer to a resumed header: the chunks it already verified,
    as half-open ``[start, end)`` index ranges (the sender sends only the rest)."""

    model_config = _FROZEN
    kind: Literal["resume"] = "resume"
    have: tuple[ChunkRange, ...] = ()


class ChunkAck(BaseModel):
    """Receiver -> sender: chunk ``index`` arrived intact (``ok``) or must be resent."""

    model_config = _FROZEN
    kind: Literal["ack"] = "ack"
    index: Annotated[int, Field(ge=0)]
    ok: bool


class TransferDone(BaseModel):
    """Receiver -> sender: the transfer is over. ``ok`` with the receiving handler's JSON
    ``result``, or not ``ok`` with ``error_type``/``error`` (digest mismatch, handler failure,
    too many bad chunks: then ``chunk`` names the chunk)."""

    model_config = _FROZEN
    kind: Literal["done"] = "done"
    ok: bool
    result: JsonValue = None
    error_type: Annotated[str, Field(max_length=256)] = ""
    error: Annotated[str, Field(max_length=65536)] = ""
    chunk: Annotated[int, Field(ge=0)] | None = None


TensorControl = Annotated[ChunkAck | TransferDone | TransferResume, Field(discriminator="kind")]
_CONTROL: TypeAdapter[ChunkAck | TransferDone | TransferResume] = TypeAdapter(TensorControl)
_HEADER = TypeAdapter(TensorHeader)


def parse_control(raw: bytes) -> ChunkAck | TransferDone | TransferResume:
    """Validate a receiver -> sender frame of the tensor stream."""
    return _CONTROL.validate_json(raw)


def parse_header(raw: bytes) -> TensorHeader:
    """Validate the first frame of a tensor transfer."""
    return _HEADER.validate_json(raw)
