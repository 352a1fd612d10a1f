"""Small Compute* messages through the generated classes (protobuf's C implementation).

Up to :data:`SMALL_MESSAGE_BYTES`, copying a message's tensors costs less than walking
its fields in Python: the generated parser and serializer take a few microseconds where
the hand-written codec takes ten to fifteen. These functions give the codec's own
dataclasses, so the rest of the code does not know which way a message went.

Parsing returns None where the hand-written walk must decide: bytes the generated parser
refuses (the walk names the field), and messages with fields it does not know, which
include known fields sent with the wrong wire type (the walk refuses those, and skips
truly unknown ones). Serializing writes ``SerializeToString(deterministic=True)``, the
bytes of the hand-written encoder with ``align=False``: a small tensor gains nothing from
alignment, since the generated parser copies it into a buffer of its own anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from .._proto.lossgrad.v1 import lossgrad_pb2 as pb
from .messages import Buffer, ComputeRequest, ComputeResponse, SharedMemoryLocation, Tensor

SMALL_MESSAGE_BYTES = 64 * 1024  # a received message up to this size is parsed here
_HEADER_BYTES = 1024  # what a small message holds besides its tensors, at most (but params)
T = TypeVar("T")


class _Unknown(Exception):
    """The message has fields the generated class does not know."""


def fits(data: Buffer) -> bool:
    """Whether a received message is small enough for the generated parser."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    return size <= SMALL_MESSAGE_BYTES


def tensors_fit(*tensors: Tensor | None) -> bool:
    """Whether the data of ``tensors`` (None: not set) together are small enough for the
    generated serializer: the message then fits :func:`fits` at the receiver."""
    total = 0
    for tensor in tensors:
        if tensor is not None:
            data = tensor.data
            total += data.nbytes if isinstance(data, memoryview) else len(data)
    return total <= SMALL_MESSAGE_BYTES - _HEADER_BYTES


def parse_request(data: Buffer) -> ComputeRequest | None:
    """A ComputeLossRequest/ComputeGradientRequest, or None (see the module's note)."""
    return _parsed(pb.ComputeGradientRequest, data, request_of)


def parse_response(data: Buffer) -> ComputeResponse | None:
    """A ComputeLossResponse/ComputeGradientResponse, or None (see the module's note)."""
    return _parsed(pb.ComputeGradientResponse, data, response_of)


def request_of(m: pb.ComputeGradientRequest, known: bool = False) -> ComputeRequest:
    """A parsed request as the codec's dataclass; with ``known``, raise ``_Unknown`` if a
    tensor or location has fields the generated class does not know."""
    has = m.HasField
    return ComputeRequest(
        loss=m.loss,
        predictions=tensor_of(m.predictions, known) if has("predictions") else None,
        targets=tensor_of(m.targets, known) if has("targets") else None,
        sample_weight=tensor_of(m.sample_weight, known) if has("sample_weight") else None,
        reduction=m.reduction,
        params=m.params if has("params") else None,
        allow_nonfinite=m.allow_nonfinite,
        hessian=m.hessian,
        hessian_floor=m.hessian_floor if has("hessian_floor") else None,
        hessian_constant=m.hessian_constant if has("hessian_constant") else None,
        gradient_output=(location_of(m.gradient_output, known) if has("gradient_output")
                         else None),
        losses_output=location_of(m.losses_output, known) if has("losses_output") else None,
        variance=tensor_of(m.variance, known) if has("variance") else None,
    )


def response_of(m: pb.ComputeGradientResponse, known: bool = False) -> ComputeResponse:
    """A parsed response as the codec's dataclass; ``known`` as in :func:`request_of`."""
    has = m.HasField
    return ComputeResponse(
        loss=m.loss,
        losses=tensor_of(m.losses, known) if has("losses") else None,
        positions=m.positions,
        positions_counted=m.positions_counted,
        weight_sum=m.weight_sum,
        gradient=tensor_of(m.gradient, known) if has("gradient") else None,
        hessian=tensor_of(m.hessian, known) if has("hessian") else None,
        variance_gradient=(tensor_of(m.variance_gradient, known) if has("variance_gradient")
                           else None),
    )


def _parsed(cls: Any, data: Buffer, convert: Callable[[Any, bool], T]) -> T | None:
    try:
        message = cls.FromString(_bytes(data))
        _known(message, True)
        return convert(message, True)
    except (DecodeError, _Unknown):
        return None


def serialize_request(r: ComputeRequest) -> bytes | None:
    """The canonical bytes of a ComputeLossRequest/ComputeGradientRequest, or None for
    values the generated class refuses (the hand-written encoder writes any)."""
    try:
        return _request_message(r).SerializeToString(deterministic=True)
    except (TypeError, ValueError):
        return None


def serialize_response(r: ComputeResponse) -> bytes | None:
    """The canonical bytes of a ComputeLossResponse/ComputeGradientResponse, or None (as
    :func:`serialize_request`)."""
    try:
        return _response_message(r).SerializeToString(deterministic=True)
    except (TypeError, ValueError):
        return None


def _request_message(r: ComputeRequest) -> pb.ComputeGradientRequest:
    scalars: dict[str, Any] = {"loss": r.loss, "reduction": r.reduction,
                               "allow_nonfinite": r.allow_nonfinite, "hessian": r.hessian}
    m = pb.ComputeGradientRequest(**scalars)
    _set_tensor(m, "predictions", r.predictions)
    _set_tensor(m, "targets", r.targets)
    _set_tensor(m, "sample_weight", r.sample_weight)
    _set_tensor(m, "variance", r.variance)
    if r.params is not None:
        m.params.CopyFrom(r.params)
        m.params.SetInParent()  # an empty params message is still sent
    if r.hessian_floor is not None:
        m.hessian_floor = r.hessian_floor
    if r.hessian_constant is not None:
        m.hessian_constant = r.hessian_constant
    _set_location(m.gradient_output, r.gradient_output)
    _set_location(m.losses_output, r.losses_output)
    return m


def _response_message(r: ComputeResponse) -> pb.ComputeGradientResponse:
    m = pb.ComputeGradientResponse(loss=r.loss, positions=r.positions,
                                   positions_counted=r.positions_counted,
                                   weight_sum=r.weight_sum)
    _set_tensor(m, "losses", r.losses)
    _set_tensor(m, "gradient", r.gradient)
    _set_tensor(m, "hessian", r.hessian)
    _set_tensor(m, "variance_gradient", r.variance_gradient)
    return m


def _bytes(data: Buffer) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def _known(message: Any, known: bool) -> None:
    if known and len(UnknownFieldSet(message)):
        raise _Unknown


def tensor_of(m: pb.Tensor, known: bool = False) -> Tensor:
    """A parsed Tensor as the codec's dataclass; ``known`` as in :func:`request_of`."""
    _known(m, known)
    location = location_of(m.shared_memory, known) if m.HasField("shared_memory") else None
    return Tensor(m.dtype, tuple(m.shape), m.data, location)


def location_of(m: pb.SharedMemoryLocation, known: bool = False) -> SharedMemoryLocation:
    """A parsed SharedMemoryLocation as the codec's dataclass."""
    _known(m, known)
    return SharedMemoryLocation(m.region, m.offset, m.byte_size)


def _set_tensor(message: Any, name: str, tensor: Tensor | None) -> None:
    if tensor is None:
        return
    field = getattr(message, name)
    field.SetInParent()  # set even when every field of the tensor is empty
    field.dtype = tensor.dtype
    field.shape.extend(tensor.shape)
    field.data = tensor.data if isinstance(tensor.data, bytes) else bytes(tensor.data)
    _set_location(field.shared_memory, tensor.shared_memory)


def _set_location(field: pb.SharedMemoryLocation, location: SharedMemoryLocation | None
                  ) -> None:
    if location is not None:
        field.SetInParent()
        field.region = location.region
        field.offset = location.offset
        field.byte_size = location.byte_size
