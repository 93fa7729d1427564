"""The data plane's wire format, one concept per submodule; everything is importable from here.

- `limits`: the protocol version, the size and count bounds, `MessageError` / `MessageTooLarge`.
- `tensor`: the dtype allow-list (`DTYPES`, `FLOAT_DTYPES`) and `Tensor`, with bfloat16 as bits.
- `codec`: the frame layout; `encode` / `decode`, the strict field readers, the message base and the
  registry of kinds `decode` reads (`KINDS`, filled by `schema`).
- `records`: the values nested in messages: `Hop`, `HopTiming`, `Sampling`.
- `schema`: the message kinds (`Forward`, `Token`, `Release`, `Error`, `Status` alias `Heartbeat`,
  `Ping`), `Message`, `Phase`, `FinishReason` and `max_hidden_tokens`.

Importers use `helix.worker.messages` (this package), never a submodule, so the cut between the
submodules can move without touching them.
"""

from helix.worker.messages.codec import KINDS, Buffer, decode, encode
from helix.worker.messages.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FORWARD_HEADER_RESERVE_BYTES,
    MAX_HEADER_BYTES,
    MAX_ID_CHARS,
    MAX_NDIM,
    MAX_ROUTE_HOPS,
    MAX_TENSORS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_ID,
    PROTOCOL_VERSION,
    MessageError,
    MessageTooLarge,
)
from helix.worker.messages.records import Hop, HopTiming, Sampling
from helix.worker.messages.schema import (
    Error,
    FinishReason,
    Forward,
    Heartbeat,
    Message,
    Phase,
    Ping,
    Release,
    Status,
    Token,
    max_hidden_tokens,
)
from helix.worker.messages.tensor import DTYPES, FLOAT_DTYPES, Tensor

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DTYPES",
    "FLOAT_DTYPES",
    "FORWARD_HEADER_RESERVE_BYTES",
    "KINDS",
    "MAX_HEADER_BYTES",
    "MAX_ID_CHARS",
    "MAX_NDIM",
    "MAX_ROUTE_HOPS",
    "MAX_TENSORS",
    "MAX_TEXT_CHARS",
    "MAX_TOKEN_ID",
    "PROTOCOL_VERSION",
    "Buffer",
    "Error",
    "FinishReason",
    "Forward",
    "Heartbeat",
    "Hop",
    "HopTiming",
    "Message",
    "MessageError",
    "MessageTooLarge",
    "Phase",
    "Ping",
    "Release",
    "Sampling",
    "Status",
    "Tensor",
    "Token",
    "decode",
    "encode",
    "max_hidden_tokens",
]
