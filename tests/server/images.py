"""Test images: real PNGs of one colour, and decompression bombs that are only a header."""

from __future__ import annotations

import io
import struct
import zlib


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (128, 128)) -> bytes:
    """A PNG of one colour."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with a few bytes of (zero) image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
