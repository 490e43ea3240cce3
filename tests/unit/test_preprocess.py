"""Image decoding (engine.images) and JAX preprocessing (engine.resampling).

Parity tolerance, JAX vs the Pillow + numpy reference, after normalisation: every value within
1/128 (one uint8 level: Pillow rounds with 22-bit fixed-point weights, the JAX path with float32
ones) and the mean difference below 0.02/128 (measured: about 0.0003/128 or less). Images more
than 8x larger than needed are box-reduced first (as Pillow's ``reducing_gap`` would); those get
3/128 and 0.5/128.

Both take the two resampling passes in one fixed order (``vertical_first``), whatever Pillow is
installed. Pillow's own two-axis ``resize`` agrees exactly from Pillow 13 on; before 13 it goes
horizontal first for the images we resample vertically first, and differs there by the rounding
in between (measured with Pillow 12.3 on these photos: at most 3 levels, 0.27 on average).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import numpy.typing as npt
import PIL
import pytest
from PIL import Image
from skimage import data as skdata

from engine.errors import (
    CorruptImageError,
    ImageDecodeError,
    NotAnImageError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedModeError,
)
from engine.images import DecodedImage, decode_image
from engine.models import UINT8_MODEL_SPEC
from engine.resampling import (
    STD,
    JaxPreprocessor,
    reference_pixels,
    reference_preprocess,
    resized_size,
    vertical_first,
)

Pixels = npt.NDArray[np.uint8]
LEVEL = 1 / STD  # one uint8 step after normalisation
MAX_PIXELS = 50_000_000
# Pillow's own resize takes our pass order from version 13 on (see the module doc).
PILLOW_ORDER_IS_OURS = int(PIL.__version__.split(".")[0]) >= 13


@pytest.fixture(scope="module")
def preprocessor() -> JaxPreprocessor:
    # Small batch sizes keep the number of compiled shapes (and the suite's time) down.
    return JaxPreprocessor(batch_sizes=(1, 4), device="cpu")


def sample(name: str) -> Pixels:
    """One of scikit-image's sample images, as RGB."""
    pixels = np.asarray(getattr(skdata, name)(), dtype=np.uint8)
    return pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)


def photo(height: int, width: int, *, seed: int = 0) -> Pixels:
    """A real photo resampled to ``height`` x ``width`` (with a little noise for detail)."""
    image = Image.fromarray(sample("astronaut")).resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).integers(-8, 9, (height, width, 3))
    noisy: Pixels = np.clip(np.asarray(image).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return noisy


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def assert_close_to_reference(
    batch: npt.NDArray[np.float32], images: list[Pixels], *, max_levels: float, mean_levels: float
) -> None:
    assert batch.shape == (len(images), 3, 224, 224) and batch.dtype == np.float32
    for row, image in zip(batch, images, strict=True):
        difference = np.abs(row - reference_preprocess(image))
        assert difference.max() <= max_levels * LEVEL + 1e-6, (image.shape, difference.max() * STD)
        assert difference.mean() <= mean_levels * LEVEL, (image.shape, difference.mean() * STD)


@pytest.fixture
def compile_events() -> Iterator[list[str]]:
    """Names of JAX backend compilations that happen during the test."""
    events: list[str] = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------------------- preprocessing


def test_parity_with_pillow_reference_across_shapes(preprocessor: JaxPreprocessor) -> None:
    images = [
        photo(480, 640),  # landscape camera frame
        photo(640, 480),  # portrait
        photo(100, 150),  # tiny: upscaled
        photo(224, 224),
        photo(20, 300),  # extreme panorama, upscaled
        photo(333, 517),  # odd sizes
        photo(257, 1001),
        photo(1000, 300),  # tall: resampled vertically first
        photo(900, 1200),
        photo(2000, 3000),  # huge (no draft for non-JPEGs)
        np.random.default_rng(1).integers(0, 256, (479, 641, 3), dtype=np.uint8),
        sample("astronaut"),
        sample("coffee"),
        sample("chelsea"),
        sample("camera"),  # grayscale, stacked to RGB
    ]
    assert_close_to_reference(
        preprocessor.preprocess(images), images, max_levels=1, mean_levels=0.02
    )


@pytest.mark.parametrize(
    "shape", [(480, 640), (640, 480), (1000, 300), (2000, 600), (100, 150), (20, 300)]
)
def test_the_reference_is_pillows_own_resize_in_our_pass_order(shape: tuple[int, int]) -> None:
    image = photo(*shape)
    out_h, out_w = resized_size(*shape, 256)
    resized = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BICUBIC))
    top, left = (out_h - 224) // 2, (out_w - 224) // 2
    pillow = resized[top : top + 224, left : left + 224].astype(np.int16)
    difference = np.abs(reference_pixels(image).astype(np.int16) - pillow)
    if PILLOW_ORDER_IS_OURS or not vertical_first(*shape, 256):
        assert difference.max() == 0
    else:  # this Pillow goes horizontal first here: other rounding between the passes
        assert difference.max() <= 4 and difference.mean() <= 0.4, (shape, difference.max())


def test_the_kernels_pass_order_does_not_depend_on_the_installed_pillow(tmp_path: Path) -> None:
    # A rebuild with another Pillow must not change a stored embedding. The kernel module is
    # imported as if Pillow were 12 (horizontal first), then 13: same pixels, bit for bit.
    image = photo(1000, 300)
    assert vertical_first(1000, 300, 256)  # where the two Pillows' orders differ
    np.save(tmp_path / "image.npy", image)
    probe = (
        "import importlib, sys\n"
        "import numpy as np, PIL, PIL.Image\n"  # Image checks the real version on import
        "image = np.load(sys.argv[1])\n"
        "outputs = []\n"
        "for version in ('12.3.0', '13.0.0'):\n"
        "    PIL.__version__ = version\n"
        "    import engine.resampling as resampling\n"
        "    resampling = importlib.reload(resampling)\n"
        "    kernel = resampling.JaxPreprocessor(\n"
        "        batch_sizes=(1,), scale_buckets=(4.0,), device='cpu', output='uint8_nhwc'\n"
        "    )\n"
        "    outputs.append(kernel.preprocess([image]))\n"
        "print('same' if np.array_equal(*outputs) else 'different')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "image.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "same"


def test_uint8_output_is_the_float32_output_before_normalising() -> None:
    images = [photo(480, 640), photo(1000, 300), photo(100, 150), sample("coffee")]
    pixels = JaxPreprocessor(batch_sizes=(4,), device="cpu", output="uint8_nhwc").preprocess(images)
    normalised = JaxPreprocessor(batch_sizes=(4,), device="cpu").preprocess(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 224, 224, 3)
    # (1000, 300) is resampled vertically first (a transposed placement): layout kept too.
    np.testing.assert_array_equal(
        (pixels.astype(np.float32).transpose(0, 3, 1, 2) - 127) / 128, normalised
    )


def test_prereduced_huge_image_stays_close(preprocessor: JaxPreprocessor) -> None:
    image = photo(2100, 2200)  # 8.2x the needed size: box-reduced by 2 on the host first
    assert_close_to_reference(
        preprocessor.preprocess([image]), [image], max_levels=3, mean_levels=0.5
    )


def test_padding_rows_do_not_leak_into_real_rows(preprocessor: JaxPreprocessor) -> None:
    images = [photo(480, 640, seed=2), photo(500, 700, seed=3), photo(600, 400, seed=4)]
    padded = preprocessor.preprocess(images)  # 3 rows, padded to the batch size 4
    assert padded.shape == (3, 3, 224, 224)
    full = preprocessor.preprocess([*images, photo(450, 450, seed=7)])  # same executable
    np.testing.assert_array_equal(padded, full[:3])
    for row, image in zip(padded, images, strict=True):
        # Batch size 1 is another executable: XLA may order float ops differently.
        np.testing.assert_allclose(row, preprocessor.preprocess([image])[0], atol=LEVEL + 1e-6)


def test_steady_state_never_recompiles(
    preprocessor: JaxPreprocessor, compile_events: list[str]
) -> None:
    preprocessor.preprocess([photo(480, 640), photo(300, 400), photo(700, 500), photo(256, 300)])
    compiled, events_before = preprocessor.compile_count, len(compile_events)
    # Different images, different sizes, same buckets and group sizes.
    second = [photo(470, 620, seed=5), photo(350, 360, seed=6), photo(640, 500), photo(290, 260)]
    assert_close_to_reference(
        preprocessor.preprocess(second), second, max_levels=1, mean_levels=0.02
    )
    assert preprocessor.compile_count == compiled
    assert len(compile_events) == events_before  # nothing else in JAX compiled either


def test_warmup_compiles_every_shape_up_front(compile_events: list[str]) -> None:
    small = JaxPreprocessor(batch_sizes=(1, 2), scale_buckets=(1.0,), device="cpu")
    small.warmup()
    assert small.compile_count == 2
    assert small.compiled_shapes == [(1, 232), (2, 232)]
    events = len(compile_events)
    # Includes an image larger than the only bucket allows: pre-reduced, same shapes.
    for images in ([photo(200, 250)], [photo(120, 90), photo(256, 256)], [photo(600, 800)]):
        assert small.preprocess(images).shape == (len(images), 3, 224, 224)
    assert small.compile_count == 2 and len(compile_events) == events


def test_empty_batch_and_invalid_images(preprocessor: JaxPreprocessor) -> None:
    assert preprocessor.preprocess([]).shape == (0, 3, 224, 224)
    for bad in (np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            preprocessor.preprocess([bad])  # type: ignore[list-item]


def test_reference_normalises_a_flat_image() -> None:
    flat = np.full((300, 400, 3), 200, dtype=np.uint8)
    np.testing.assert_allclose(reference_preprocess(flat), (200 - 127) / 128)


def test_device_selection() -> None:
    assert JaxPreprocessor(device="cpu").device.platform == "cpu"
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        assert JaxPreprocessor(device="auto").device.platform == "gpu"
    else:
        assert JaxPreprocessor(device="auto").device.platform == "cpu"
        with pytest.raises(RuntimeError, match="no GPU"):
            JaxPreprocessor(device="gpu")


# ---------------------------------------------------------------------------- decoding


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but carries no pixel data to speak of."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def reason_of(data: bytes, *, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, max_pixels=max_pixels)
    assert isinstance(caught.value, ValueError)
    return caught.value.reason


def test_decode_jpeg_to_rgb() -> None:
    decoded = decode_image(encode(Image.fromarray(photo(120, 160)), "JPEG"), max_pixels=MAX_PIXELS)
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.shape == (120, 160, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.original_size == (160, 120) and decoded.format == "JPEG"


def test_decode_errors_carry_dead_letter_reasons() -> None:
    jpeg = encode(Image.fromarray(photo(200, 300)), "JPEG")
    png = encode(Image.new("RGB", (32, 24), (9, 9, 9)), "PNG")
    assert reason_of(np.random.default_rng(0).bytes(5000)) == "not_an_image"
    assert reason_of(b"") == "not_an_image"
    assert reason_of(encode(Image.new("RGB", (16, 16)), "ICO")) == "not_an_image"  # not allowed
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated_image"
    assert reason_of(png[:40]) == "truncated_image"  # ends inside the header
    corrupt = bytearray(encode(Image.fromarray(photo(64, 64)), "PNG"))
    start = corrupt.index(b"IDAT") + 20
    corrupt[start : start + 40] = bytes(40)
    assert reason_of(bytes(corrupt)) == "corrupt_image"
    with pytest.raises(CorruptImageError):
        decode_image(bytes(corrupt), max_pixels=MAX_PIXELS)
    with pytest.raises(TruncatedImageError):
        decode_image(png[:40], max_pixels=MAX_PIXELS)
    with pytest.raises(NotAnImageError):
        decode_image(b"GIF", max_pixels=MAX_PIXELS)


def test_pixel_bombs_are_refused_before_decoding() -> None:
    # Pillow's own limit (error above 2x MAX_IMAGE_PIXELS) and its warning band, both converted.
    assert reason_of(png_header_only(50_000, 50_000), max_pixels=10**12) == "too_many_pixels"
    assert reason_of(png_header_only(10_000, 10_000), max_pixels=10**12) == "too_many_pixels"
    # Our own limit, checked from the header.
    assert reason_of(png_header_only(3_000, 2_000), max_pixels=5_000_000) == "too_many_pixels"
    real = encode(Image.fromarray(photo(1000, 1000)), "PNG")
    with pytest.raises(TooManyPixelsError):
        decode_image(real, max_pixels=999_999)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I;16", "PNG"),
        ("I;16B", "TIFF"),
        ("I", "TIFF"),
        ("YCbCr", "TIFF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_modes_decode_to_rgb_uint8(mode: str, fmt: str) -> None:
    image = Image.fromarray(photo(30, 40)).convert(mode if mode not in ("I;16", "I;16B") else "I")
    if mode in ("I;16", "I;16B"):
        image = image.convert(mode)
    decoded = decode_image(encode(image, fmt), max_pixels=MAX_PIXELS)
    assert decoded.pixels.shape == (30, 40, 3) and decoded.pixels.dtype == np.uint8


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent black right
    pixels = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=100).pixels
    assert (pixels[:, :4] == (255, 0, 0)).all() and (pixels[:, 4:] == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    transparent = encode(palette, "PNG", transparency=0)
    assert (decode_image(transparent, max_pixels=100).pixels == 255).all()


def test_sixteen_bit_keeps_the_high_byte() -> None:
    wide = np.array([[0, 256, 32_768, 65_535]], dtype=np.uint16)
    image = Image.fromarray(wide)
    assert image.mode == "I;16"
    pixels = decode_image(encode(image, "PNG"), max_pixels=100).pixels
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_images_are_unsupported() -> None:
    data = encode(Image.new("F", (4, 4), 0.5), "TIFF")
    assert reason_of(data) == "unsupported_mode"
    with pytest.raises(UnsupportedModeError):
        decode_image(data, max_pixels=100)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left edge becomes the top
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes()), max_pixels=MAX_PIXELS)
    assert decoded.pixels.shape == (64, 32, 3)
    assert decoded.original_size == (32, 64)
    top, bottom = decoded.pixels[8, 16].astype(int), decoded.pixels[56, 16].astype(int)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_jpeg_draft_decodes_just_large_enough() -> None:
    big = Image.fromarray(photo(1536, 2048))
    short = UINT8_MODEL_SPEC.resize_short_side  # the model's resize: 256
    decoded = decode_image(encode(big, "JPEG"), max_pixels=MAX_PIXELS, target_short_side=short)
    assert decoded.original_size == (2048, 1536)
    assert decoded.pixels.shape == (384, 512, 3)  # DCT-scaled by 4; by 8 would be < 256
    # Without a target (no model named), the full size.
    assert decode_image(encode(big, "JPEG"), max_pixels=MAX_PIXELS).pixels.shape == (1536, 2048, 3)
    small = decode_image(encode(big, "JPEG"), max_pixels=MAX_PIXELS, target_short_side=1536)
    assert small.pixels.shape == (1536, 2048, 3)
