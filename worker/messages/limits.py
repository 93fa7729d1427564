"""The protocol's version and bounds, and the errors for a message outside them.

Every other submodule checks against these numbers (the codec when it reads frames and header
fields, the schema when it sizes a route or a prompt chunk, `Tensor` when it refuses a dtype), so
they sit underneath all of them, importable without pulling in either side. Any change to the
fields is a `PROTOCOL_VERSION` bump: peers of different versions reject each other loudly rather
than misread each other.
"""

from __future__ import annotations

#: 2: Status carries `rejected_connections`.
PROTOCOL_VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 16
MAX_NDIM = 8
MAX_ROUTE_HOPS = 256
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 8192
MAX_TOKEN_ID = 2**31 - 1
#: Room a Forward keeps for its header beside the hidden states: the longest header the limits above
#: allow a hidden-state Forward (256 hops and their timings, 1 KiB addresses, 1024 stop tokens) is
#: under 0.5 MiB.
FORWARD_HEADER_RESERVE_BYTES = 1 << 20


class MessageError(ValueError):
    """A message that cannot be encoded or that failed validation on decode."""


class MessageTooLarge(MessageError):
    """A message over the configured byte limit (a distinct class so receivers can count it)."""
