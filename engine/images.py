"""Decode untrusted image bytes into RGB pixels, refusing bombs and broken files early.

The worker dead-letters every :class:`ImageDecodeError` with its ``reason``, so each failure maps
to one stable code: ``not_an_image``, ``truncated_image``, ``corrupt_image``, ``too_many_pixels``
or ``unsupported_mode``. Verification is a full decode (not ``Image.verify()``, which skips
pixel data and would let a truncated file through to preprocessing).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import (
    CorruptImageError,
    ImageDecodeError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedModeError,
)

logger = logging.getLogger(__name__)

# Only formats photos arrive in. Limiting Image.open also keeps Pillow away from plugins that
# shell out (EPS runs Ghostscript) or are rarely hardened (PSD, ICNS, FITS, ...).
# (Multi-picture JPEGs open through the JPEG plugin and report format "MPO".)
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What Pillow's plugins and decoders raise on malformed data (found by its fuzzers); anything
# else is a bug here, not a bad image, and propagates.
_DATA_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)

_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHITE = (255, 255, 255)
# warnings.catch_warnings() swaps a process-wide filter list (not thread-safe before Python
# 3.14); serialise our own use of it. It only guards the header parse, which is microseconds.
_WARNINGS_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """Decoded pixels plus what the file said about itself.

    ``pixels`` is uint8 ``[height, width, 3]`` RGB, upright (EXIF orientation applied). For
    JPEGs it may be smaller than the original (draft decoding), never with a shorter side below
    the ``target_short_side`` asked for (unless the original is smaller). ``original_size`` is
    the full-resolution ``(width, height)``, upright.
    """

    pixels: npt.NDArray[np.uint8]
    original_size: tuple[int, int]
    format: str


def decode_image(
    data: bytes, *, max_pixels: int, target_short_side: int | None = None
) -> DecodedImage:
    """Decode ``data`` (JPEG, PNG, WebP, GIF, BMP, TIFF) to upright RGB uint8 pixels.

    The pixel count in the header is checked against ``max_pixels`` (``fetch.max_pixels``)
    before any pixel is decoded, and before Pillow's own decompression-bomb limit, so that the
    error names ours.
    Given ``target_short_side`` (the shorter side the model's preprocessing resizes to, e.g. a
    preprocessor's ``decode_short_side``), JPEGs are decoded in draft mode (DCT-domain
    downscaling by 2, 4 or 8) to the smallest size whose shorter side is still at least that;
    without it, at full size. Transparent images are composited
    on white; 16-bit images keep their 8 most significant bits; only the first frame of animations
    is used.

    Raises:
        NotAnImageError: not an image in a supported format.
        TruncatedImageError: the data ends before the image does.
        CorruptImageError: the decoder rejects the data.
        TooManyPixelsError: more than ``max_pixels`` pixels, or more than Pillow's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), whatever ``max_pixels`` is.
        UnsupportedModeError: a pixel format with no RGB rendering (e.g. 32-bit float).
    """
    image = _open(data, max_pixels)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"{width}x{height} = {width * height} pixels exceeds fetch.max_pixels={max_pixels}"
        )
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        # Pillow's decompression-bomb limit caps what any setting allows (its warning, silenced
        # in _open for the check above to come first, is an error here).
        raise TooManyPixelsError(
            f"{width}x{height} = {width * height} pixels exceeds the decoder's limit of "
            f"{Image.MAX_IMAGE_PIXELS} (fetch.max_pixels={max_pixels} is set above it)"
        )
    if (
        target_short_side is not None
        and image.format in ("JPEG", "MPO")
        and min(width, height) > target_short_side
    ):
        scale = target_short_side / min(width, height)
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    _load(image, data, max_pixels)
    file_format = str(image.format)  # transposed copies lose .format
    try:
        orientation = int(image.getexif().get(0x0112, 1))  # ExifTags.Base.Orientation
    except _DATA_ERRORS:  # malformed EXIF must not cost the image; it just stays unrotated
        orientation = 1
    original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if orientation != 1:
        try:
            image = ImageOps.exif_transpose(image)
        except _DATA_ERRORS as exc:  # same reasoning: rotation is best effort on broken EXIF
            logger.debug("ignoring unusable EXIF orientation %s: %s", orientation, exc)
    pixels = _to_rgb(image)
    return DecodedImage(pixels=pixels, original_size=original_size, format=file_format)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (Pillow decodes lazily)."""
    if not data:
        raise NotAnImageError("empty image data")
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that: the caller checks the
            # size against max_pixels first (so the error names our limit), then against that.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _over_pillows_ceiling(max_pixels) from exc
    except UnidentifiedImageError as exc:
        # A known signature whose header Pillow cannot parse: usually a download cut short.
        cut_short = _header_cut_short(data)
        if cut_short or (cut_short is None and data.startswith(_SIGNATURES)):
            raise TruncatedImageError("image header is cut short") from exc
        raise NotAnImageError("not an image in a supported format") from exc
    except _DATA_ERRORS as exc:
        raise _classify(exc, data) from exc


def _load(image: Image.Image, data: bytes, max_pixels: int) -> None:
    """Decode every pixel now, so broken data fails here rather than in preprocessing."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:  # a GIF frame larger than its screen
        raise _over_pillows_ceiling(max_pixels) from exc
    except _DATA_ERRORS as exc:
        raise _classify(exc, data) from exc


def _over_pillows_ceiling(max_pixels: int) -> TooManyPixelsError:
    # Pillow refuses this size outright, before saying what it is: more than twice its
    # MAX_IMAGE_PIXELS, which no setting of ours raises (a process-wide value, left as it is).
    # Below our limit or not, the message names it: it is the one an operator sets.
    ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if max_pixels < ceiling:
        return TooManyPixelsError(
            f"image has more than {ceiling} pixels, exceeding fetch.max_pixels={max_pixels}"
        )
    return TooManyPixelsError(
        f"image has more than {ceiling} pixels, the most the decoder takes at all (whatever "
        f"fetch.max_pixels={max_pixels} allows)"
    )


def _classify(exc: Exception, data: bytes) -> ImageDecodeError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in message.lower() or _header_cut_short(data):
        return TruncatedImageError(message)
    return CorruptImageError(message)


def _header_cut_short(data: bytes) -> bool | None:
    """Whether a PNG ends before its first IDAT chunk or a WebP before its RIFF length.

    None for other formats: their headers give no cheap answer.
    """
    if data.startswith(_PNG_SIGNATURE):
        pos = len(_PNG_SIGNATURE)
        while pos + 8 <= len(data):
            if data[pos + 4 : pos + 8] == b"IDAT":
                return False
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
        return True
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return None


def _to_rgb(image: Image.Image) -> npt.NDArray[np.uint8]:
    """RGB uint8 ``[h, w, 3]`` from any supported mode."""
    mode = image.mode
    if mode == "RGB":
        rgb = image
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba.getchannel("A"))  # alpha-blend onto white
    elif mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        rgb = image.convert("RGB")
    elif mode.startswith("I;16") or mode == "I":
        # Pillow's own I;16 -> L conversion clips at 255; keep the high byte instead.
        wide = np.asarray(image).astype(np.int64)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    else:
        raise UnsupportedModeError(f"unsupported pixel mode {mode!r}")
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedModeError(f"mode {mode!r} did not convert to RGB: {pixels.shape}")
    return pixels
