"""A strict reader of lib0 encoding (Yjs's varints and length-prefixed bytes).

Every length is checked against the bytes really present: pycrdt's own decoder returns a
short slice for a truncated message, which would let a malformed frame through.
"""

from __future__ import annotations


class Lib0Error(ValueError):
    """Malformed or truncated lib0 data."""


class Reader:
    __slots__ = ("buf", "error", "pos")

    def __init__(self, buf: bytes, error: type[ValueError] = Lib0Error) -> None:
        self.buf = buf
        self.pos = 0
        self.error = error

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise self.error("truncated message")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        pos = self.pos
        if pos < len(self.buf) and self.buf[pos] < 0x80:  # most are one byte: fast path
            self.pos = pos + 1
            return self.buf[pos]
        n, shift = 0, 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7
            if shift > 63:
                raise self.error("integer too large")

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.error(
                f"truncated message ({n} bytes announced, {len(self.buf) - self.pos} present)"
            )
        self.pos += n

    def chunk(self) -> bytes:
        """Length-prefixed bytes."""
        n = self.uint()
        start = self.pos
        self.skip(n)
        return self.buf[start : self.pos]

    def text(self, what: str = "string") -> str:
        """Length-prefixed UTF-8 string (``what`` names it in the error)."""
        try:
            return self.chunk().decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not UTF-8") from None


def uint_bytes(n: int) -> bytes:
    """Encode a non-negative integer as a lib0 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)
