"""XDR (RFC 4506) primitives over bytes: no I/O, no knowledge of PKCS#11.

Only the subset Caml Crush's protocol uses: 32-bit words, 64-bit hypers and
variable-length opaques.  Every length read from the wire is checked against the
bytes actually present *and* against a caller-supplied bound before anything is
allocated or sliced.
"""

from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MASK64 = (1 << 64) - 1
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class XdrError(ValueError):
    """The bytes are not a valid encoding of the expected value."""


class Packer:
    """Appends XDR encodings to a growing buffer."""

    __slots__ = ("_buf",)

    def __init__(self, buf: bytearray | None = None) -> None:
        """Append to ``buf`` (e.g. after room left for a header) or to a new buffer."""
        self._buf = bytearray() if buf is None else buf

    def uint(self, value: int) -> None:
        self._buf += _U32.pack(value & 0xFFFFFFFF)

    def hyper(self, value: int) -> None:
        # CK_ULONG values such as CK_UNAVAILABLE_INFORMATION (~0) and negative
        # "error" values both travel as the 64-bit two's-complement pattern.
        self._buf += _U64.pack(value & _MASK64)

    def opaque(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._buf += _U32.pack(n)
        self._buf += data
        self._buf += _PAD[n & 3]

    def raw(self, data: bytes) -> None:
        self._buf += data

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def buffer(self) -> bytearray:
        return self._buf


class Unpacker:
    """Reads XDR values from a bytes-like object, bounds-checked."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self._data = data
        self._pos = pos
        self._end = len(data)

    @property
    def position(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return self._end - self._pos

    def uint(self) -> int:
        pos = self._pos
        if pos + 4 > self._end:
            raise XdrError("truncated: expected a 4-byte word")
        self._pos = pos + 4
        value: int = _U32.unpack_from(self._data, pos)[0]
        return value

    def hyper(self) -> int:
        """An unsigned 64-bit value (CK_ULONG semantics)."""
        pos = self._pos
        if pos + 8 > self._end:
            raise XdrError("truncated: expected an 8-byte hyper")
        self._pos = pos + 8
        value: int = _U64.unpack_from(self._data, pos)[0]
        return value

    def fixed(self, st: struct.Struct) -> tuple[int, ...]:
        """Several fixed-size values at once (a precompiled run of hypers)."""
        pos = self._pos
        end = pos + st.size
        if end > self._end:
            raise XdrError(f"truncated: expected {st.size} bytes")
        self._pos = end
        values: tuple[int, ...] = st.unpack_from(self._data, pos)
        return values

    def opaque(self, bound: int) -> bytes:
        n = self.uint()
        if n > bound:
            raise XdrError(f"opaque of {n} bytes exceeds the bound of {bound}")
        start = self._pos
        end = start + n
        padded = end + (-n & 3)
        if padded > self._end:
            raise XdrError(f"truncated: opaque of {n} bytes")
        self._pos = padded
        return bytes(self._data[start:end])

    def count(self, bound: int, item_min_size: int) -> int:
        """A variable-array count, checked against a bound and the bytes left."""
        n = self.uint()
        if n > bound:
            raise XdrError(f"array of {n} elements exceeds the bound of {bound}")
        if n * item_min_size > self._end - self._pos:
            raise XdrError(f"truncated: array of {n} elements")
        return n

    def done(self) -> None:
        if self._pos != self._end:
            raise XdrError(f"{self._end - self._pos} bytes of trailing garbage")


def to_signed64(value: int) -> int:
    """Interpret a 64-bit pattern as a signed number (for logging CK_RV -1 etc.)."""
    return value - (1 << 64) if value & (1 << 63) else value
