"""Pixel limits name ours (``fetch.max_pixels``), never Pillow's decompression-bomb limit, and
leave Pillow's process-wide settings as they were. The images are PNG headers built by hand:
no pixel of them is ever made."""

from __future__ import annotations

import struct
import warnings
import zlib

import pytest
from PIL import Image

from engine.errors import TooManyPixelsError
from engine.images import decode_image

MAX_PIXELS = 50_000_000  # the default fetch.max_pixels


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of that size whose pixel data stops after one row."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row))
        + _chunk(b"IEND", b"")
    )


def test_a_100_megapixel_image_names_our_limit_not_pillows() -> None:
    # 100,020,001 pixels: over fetch.max_pixels and over Pillow's own warning limit (~89.5M).
    with pytest.raises(TooManyPixelsError) as refused:
        decode_image(_png(10_001, 10_001), max_pixels=MAX_PIXELS)
    message = str(refused.value)
    assert "10001x10001" in message and f"fetch.max_pixels={MAX_PIXELS}" in message
    assert "decompression bomb" not in message
    assert refused.value.reason == "too_many_pixels"


def test_an_image_over_pillows_ceiling_names_our_limit_too() -> None:
    # 200,000,000 pixels: Pillow refuses it outright (over twice its limit) before we see it.
    with pytest.raises(TooManyPixelsError) as refused:
        decode_image(_png(20_000, 10_000), max_pixels=MAX_PIXELS)
    assert f"fetch.max_pixels={MAX_PIXELS}" in str(refused.value)
    assert "decompression bomb" not in str(refused.value)


def test_pillows_limit_still_caps_a_larger_setting_and_says_so() -> None:
    # fetch.max_pixels set above Pillow's limit does not lift it; the message says which.
    with pytest.raises(TooManyPixelsError) as refused:
        decode_image(_png(10_001, 10_001), max_pixels=120_000_000)
    message = str(refused.value)
    assert f"decoder's limit of {Image.MAX_IMAGE_PIXELS}" in message
    assert "fetch.max_pixels=120000000" in message


def test_pillows_process_wide_settings_are_left_as_they_were() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    with pytest.raises(TooManyPixelsError):
        decode_image(_png(10_001, 10_001), max_pixels=MAX_PIXELS)
    assert limit == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters
