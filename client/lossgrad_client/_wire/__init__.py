"""The Compute* messages of ``lossgrad.v1``, encoded and decoded by hand for the tensors.

The generated protobuf classes copy a tensor's bytes when they parse a message, again
each time ``Tensor.data`` is read, and again when a message is built and serialized.
This package reads and writes the same protobuf wire format (same field numbers and
encodings; any protobuf peer reads what it writes and writes what it reads) with fewer
copies:

- :mod:`.decode` returns tensors whose ``data`` is a ``memoryview`` slice of the
  received bytes: no copy;
- :mod:`.encode` joins small headers and the arrays' own buffers with ``b"".join``: each
  array's bytes are copied once, into the message. It lays a tensor out so that its data
  starts at a multiple of the item size (the receiver can use it in place as an aligned
  array), using only what protobuf requires every parser to accept; with
  ``align=False`` it writes exactly ``SerializeToString(deterministic=True)``.

Messages of up to 64 KiB go through the generated classes instead (:mod:`.small`): at
that size their copies cost less than walking the fields in Python, so the walk is for
the large ones, where the copies matter.

Parsing follows protobuf's rules for whatever a conforming encoder may send: fields in
any order, unknown fields skipped (wire types 0, 1, 2 and 5), a field sent twice (the
last scalar wins, embedded messages merge), ``shape`` packed or unpacked, overlong
varints. It is stricter than protobuf where no conforming encoder of this schema goes:
a known field with the wrong wire type, and groups (wire types 3 and 4), are errors
instead of skipped unknown fields. A message of more than a few thousand fields and
shape entries goes to the generated parser instead (C speed, whatever the count).
Malformed bytes raise :class:`WireError` naming the field; nothing else is raised.
"""

from .decode import parse_request, parse_response, parse_stream_request, parse_stream_response
from .encode import (
    serialize_request,
    serialize_response,
    serialize_stream_request,
    serialize_stream_response,
)
from .messages import (
    DATA_TYPES,
    LITTLE_ENDIAN,
    Buffer,
    ComputeRequest,
    ComputeResponse,
    SharedMemoryLocation,
    StreamRequest,
    StreamResponse,
    Tensor,
    WireError,
    data_type,
    wire_dtype,
)

__all__ = [
    "DATA_TYPES",
    "LITTLE_ENDIAN",
    "Buffer",
    "ComputeRequest",
    "ComputeResponse",
    "StreamRequest",
    "StreamResponse",
    "SharedMemoryLocation",
    "Tensor",
    "WireError",
    "data_type",
    "parse_request",
    "parse_response",
    "parse_stream_request",
    "parse_stream_response",
    "serialize_request",
    "serialize_response",
    "serialize_stream_request",
    "serialize_stream_response",
    "wire_dtype",
]
