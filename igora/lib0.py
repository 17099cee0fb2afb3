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
        if pos < len(self.buf) and self.buf[pos] < 0x80:  # inlined fast path of uint_at
            self.pos = pos + 1
            return self.buf[pos]
        n, self.pos = uint_at(self.buf, pos, self.error)
        return n

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


def uint_at(buf: bytes, pos: int, error: type[ValueError] = Lib0Error) -> tuple[int, int]:
    """The varint at ``pos`` of ``buf``, and the position after it (for a hot path that
    needs no ``Reader``)."""
    if pos < len(buf) and buf[pos] < 0x80:  # most are one byte: fast path
        return buf[pos], pos + 1
    n, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise error("truncated message")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise error("integer too large")


def chunk_end(buf: bytes, pos: int, error: type[ValueError] = Lib0Error) -> int:
    """The position after the length-prefixed bytes at ``pos`` of ``buf``, checking they
    are all there (to skip them without a ``Reader`` or a copy)."""
    if pos < len(buf) and buf[pos] < 0x80:  # inlined fast path of uint_at
        n = buf[pos]
        pos += 1
    else:
        n, pos = uint_at(buf, pos, error)
    if pos + n > len(buf):
        raise error(f"truncated message ({n} bytes announced, {len(buf) - pos} present)")
    return pos + n


def chunk_at(buf: bytes, pos: int) -> tuple[bytes, int]:
    """The length-prefixed bytes at ``pos`` of ``buf`` (whose framing was checked
    already), and the position after them."""
    n, pos = uint_at(buf, pos)
    return buf[pos : pos + n], pos + n


def uint_bytes(n: int) -> bytes:
    """Encode a non-negative integer as a lib0 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)
