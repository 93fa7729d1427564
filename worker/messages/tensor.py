"""Tensors as they travel: the dtype allow-list (`DTYPES`) and `Tensor`, an array plus its dtype name.

Dtypes (`DTYPES`): float16, bfloat16, float32, int32, int64. numpy has no bfloat16, so a bfloat16
tensor travels as its raw 16-bit pattern: `Tensor.array` is a uint16 view and `Tensor.dtype` says
"bfloat16"; `Tensor.to_torch()` reinterprets it without a copy (`Tensor.as_float32()` widens it for
numpy-only code). Decoded arrays are zero-copy views of the received frames: writable when
the frame is a ZeroMQ message (its memory belongs to this message alone), read-only when it is
`bytes`.

A module of its own because it is where the wire format meets the model's arrays (a worker turns
hidden states into and out of numpy or torch here), and the only part that imports torch, an
optional dependency, and only when a tensor is converted.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from helix.worker.messages.limits import MessageError

if TYPE_CHECKING:  # torch is an optional dependency (the `worker` extra)
    import torch

# Wire dtype name → numpy dtype of the frame (little-endian on the wire).
DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32"})


class Tensor:
    """A tensor as it travels: a C-contiguous numpy array plus its logical dtype name.

    Kept separate from np.ndarray because bfloat16 has no numpy dtype: its array is the uint16
    bit pattern and `dtype` carries the truth.
    """

    __slots__ = ("array", "dtype")
    __hash__ = None  # type: ignore[assignment]  # mutable payload, compared by value

    def __init__(self, array: np.ndarray, dtype: str | None = None) -> None:
        name = dtype if dtype is not None else array.dtype.name
        if name not in DTYPES:
            raise MessageError(f"dtype {name!r} is not allowed (allowed: {', '.join(DTYPES)})")
        want = DTYPES[name]
        if array.dtype != want:
            raise MessageError(f"array dtype {array.dtype} does not carry {name} (want {want})")
        self.array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self.dtype = name

    @classmethod
    def of(cls, value: np.ndarray | torch.Tensor | Tensor) -> Tensor:
        """Wrap a numpy array, a torch tensor (any device) or an existing Tensor."""
        if isinstance(value, Tensor):
            return value
        if isinstance(value, np.ndarray):
            return cls.from_numpy(value)
        if hasattr(value, "detach") and hasattr(value, "dtype"):
            return cls.from_torch(value)
        raise MessageError(f"cannot send a {type(value).__name__} as a tensor")

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        """From numpy; an ml_dtypes bfloat16 array is carried as its uint16 bit pattern."""
        if array.dtype.name == "bfloat16":
            return cls(np.ascontiguousarray(array).view(np.uint16), "bfloat16")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return cls(array)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> Tensor:
        """From torch: moved to CPU (a GPU tensor must be copied out anyway), bfloat16 via int16 view."""
        import torch

        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return cls(t.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        return cls(t.numpy())

    def to_torch(self, device: str | torch.device | None = None) -> torch.Tensor:
        """As a torch tensor, zero-copy on CPU (from a `bytes` frame it is read-only: clone before in-place ops)."""
        import torch

        arr = self.array.view(np.int16) if self.dtype == "bfloat16" else self.array
        with warnings.catch_warnings():
            # from_numpy warns about read-only arrays, which is what a `bytes` frame gives.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t if device is None else t.to(device)

    def as_float32(self) -> np.ndarray:
        """A float32 copy (widens bfloat16 bit patterns exactly) for numpy-only consumers."""
        if self.dtype == "bfloat16":
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and self.array.tobytes() == other.array.tobytes()

    def __repr__(self) -> str:
        return f"Tensor(dtype={self.dtype}, shape={self.shape})"
