"""Compressed bytes unpacked with a ceiling: a page that expands past its limit is refused before it
is held, however small it was on the wire.

An HTTP page can be compressed twice over: by its `Content-Encoding` (gzip or deflate) and, inside
that, by its content (a `.csv.gz` served as is). Both expansions count against the source's
`max_response_bytes`. A size check (`keep=False`) unpacks at most STEP bytes at a time and drops
them, so a 100 KB body that would become 500 MB costs a megabyte of memory to refuse.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

STEP = 1 << 20  # bytes unpacked per call, at most
GZIP_MAGIC = b"\x1f\x8b"
ENCODINGS = ("gzip", "x-gzip", "deflate")
ACCEPT_ENCODING = "gzip, deflate"  # what Ingot asks for, so that nothing else comes back


class TooLarge(Exception):
    """More than the limit came out."""


class Unsupported(Exception):
    """A content encoding Ingot does not unpack."""


def _decompressor(encoding: str, data: bytes) -> Callable[[], zlib._Decompress]:
    if encoding in ("gzip", "x-gzip"):
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        # "deflate" is meant to be zlib-wrapped; some servers send it raw, as browsers accept.
        wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return lambda: zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
    raise Unsupported(encoding)


def inflate(data: bytes, encoding: str, limit: int, *, keep: bool = True) -> bytes:
    """DATA unpacked (every gzip member of it, as `gzip` reads them); TooLarge as soon as more than
    LIMIT bytes have come out; zlib.error for data that is not what ENCODING says. With KEEP false
    the output is only counted (b"" is returned), holding no more than STEP bytes at once."""
    new = _decompressor(encoding.strip().lower(), data)
    decompressor, pending = new(), data
    out, total = bytearray(), 0
    while True:
        piece = decompressor.decompress(pending, STEP)
        total += len(piece)
        if total > limit:
            raise TooLarge(f"more than {limit:,} bytes once unpacked")
        if keep:
            out += piece
        pending = decompressor.unconsumed_tail
        if pending or piece:
            continue
        rest = decompressor.unused_data
        if decompressor.eof and rest.startswith(GZIP_MAGIC) and encoding != "deflate":
            decompressor, pending = new(), rest  # the next member of a multi-member gzip
            continue
        if not decompressor.eof:
            raise zlib.error("the compressed data ends early")
        return bytes(out)
