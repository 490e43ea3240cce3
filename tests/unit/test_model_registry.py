"""The model registry (issue 23.1, 23.3): specs, settings that name a model and follow it, the
preprocessing in every input format, a user's ONNX model checked and written with its spec,
the start-up check of the served model, and ``trident-models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import yaml

from engine.errors import (
    ConfigurationError,
    InferenceConfigurationError,
    ModelMismatchError,
    ModelSpecError,
    UnknownModelError,
)
from engine.inference import TritonEmbedder
from engine.models import (
    BUILTIN_MODEL_SPECS,
    DEFAULT_MODEL_SPEC,
    LITE1_MODEL_SPEC,
    LITE2_MODEL_SPEC,
    MODEL_SPEC_FILE,
    UINT8_MODEL_SPEC,
    ModelSpec,
    load_model_spec_file,
    model_registry,
    model_spec,
    repository_model_specs,
    tensor_problems,
)
from engine.preprocess import build_preprocessor
from engine.resampling import JaxPreprocessor, reference_pixels
from engine.settings import Settings, TritonSettings, load_settings
from jax_embedding.config import ServiceConfig
from model_build.models_cli import add_model, main, onnx_tensors
from tests.support.own_model import (
    FLOAT_NCHW,
    PIXELS_NHWC,
    build_model,
    spec_of,
    write_files,
)

CUSTOM = "tests.support.custom_preprocessing:GreyscalePreprocessor"
OWN = spec_of(FLOAT_NCHW)
PIXELS = spec_of(PIXELS_NHWC)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(base.repeat(8, 0).repeat(8, 1)[:height, :width])


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A Triton model repository holding both user models, written by ``add_model``."""
    root = tmp_path / "repository"
    for values in (FLOAT_NCHW, PIXELS_NHWC):
        spec = spec_of(values)
        files = write_files(tmp_path / spec.name, values, build_model(spec))
        add_model(*files, root)
    return root


# The registry ----------------------------------------------------------------------------------


def test_the_registry_holds_every_built_in_model_by_its_triton_name() -> None:
    registry = model_registry()
    assert list(registry) == [spec.name for spec in BUILTIN_MODEL_SPECS]
    assert registry["efficientnet_lite0_embedding_uint8"] is UINT8_MODEL_SPEC
    for spec, side, short, tag in (
        (LITE1_MODEL_SPEC, 240, 274, "efficientnet_lite1-imagenet-v1"),
        (LITE2_MODEL_SPEC, 260, 297, "efficientnet_lite2-imagenet-v1"),
    ):
        assert (spec.image_size, spec.resize_short_side, spec.output_dim) == (side, short, 1280)
        assert (spec.model_version_tag, spec.input_format) == (tag, "uint8_nhwc")
        assert spec.family == "efficientnet_lite" and spec.weights_file
        assert spec.weights_file.startswith("models/efficientnet-lite")
    assert {s.family for s in BUILTIN_MODEL_SPECS} == {"efficientnet_lite"}
    # Same weights and tag for Lite0's uint8 and float32 inputs: one embedding space.
    assert UINT8_MODEL_SPEC.model_version_tag == DEFAULT_MODEL_SPEC.model_version_tag


def test_an_unknown_name_names_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="efficientnet_lite2_embedding_uint8") as raised:
        model_spec("efficientnet_lite9")
    assert isinstance(raised.value, ConfigurationError)
    assert model_spec(OWN.name, model_registry([OWN])) is OWN


def test_a_user_model_cannot_take_a_built_in_or_a_taken_name() -> None:
    with pytest.raises(ModelSpecError, match="built-in"):
        model_registry([OWN.model_copy(update={"name": UINT8_MODEL_SPEC.name})])
    with pytest.raises(ModelSpecError, match="another spec"):
        model_registry([OWN, OWN])


def test_a_spec_says_what_the_model_is_and_has_no_default_for_it() -> None:
    with pytest.raises(ValueError, match="output_dim"):
        ModelSpec(**{k: v for k, v in OWN.model_dump().items() if k != "output_dim"})
    assert PIXELS.input_dims == (112, 112, 3) and PIXELS.input_dtype == "UINT8"
    assert OWN.input_dims == (3, 96, 96) and OWN.input_dtype == "FP32"
    nhwc = OWN.model_copy(update={"input_format": "float32_nhwc"})
    assert nhwc.input_dims == (96, 96, 3) and nhwc.input_dtype == "FP32"


def test_spec_files_are_read_with_every_problem_named(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    values = {k: v for k, v in FLOAT_NCHW.items() if k != "resize_short_side"}
    path.write_text(
        yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    )
    spec = load_model_spec_file(path)
    assert spec.family == "onnx" and spec.resize_short_side == spec.image_size == 96
    path.write_text(yaml.safe_dump({"name": "x", "output_dim": 0}))
    with pytest.raises(ModelSpecError, match=r"output_dim: .*greater than or equal to 1") as bad:
        load_model_spec_file(path)
    assert "input_name: Field required" in str(bad.value) and str(path) in str(bad.value)
    path.write_text("[1, 2]")
    with pytest.raises(ModelSpecError, match="must hold a mapping"):
        load_model_spec_file(path)
    with pytest.raises(ModelSpecError, match="cannot read"):
        load_model_spec_file(tmp_path / "missing.yaml")


def test_a_repository_s_specs_are_found_by_folder(repository: Path) -> None:
    specs = repository_model_specs(repository)
    assert [s.name for s in specs] == sorted([OWN.name, PIXELS.name])
    assert specs[0] == OWN
    moved = repository / "elsewhere"
    (repository / OWN.name).rename(moved)
    with pytest.raises(ModelSpecError, match="lies in folder 'elsewhere'"):
        repository_model_specs(repository)
    with pytest.raises(ModelSpecError, match="not a folder"):
        repository_model_specs(repository / "nope")


# Settings name a model; the rest follows ---------------------------------------------------


@pytest.mark.parametrize("spec", BUILTIN_MODEL_SPECS, ids=lambda s: s.name)
def test_naming_a_built_in_model_derives_everything_from_its_spec(spec: ModelSpec) -> None:
    settings = Settings(triton={"model_name": spec.name})
    assert settings.model == spec
    t, p = settings.triton, settings.preprocess
    assert (t.input_format, t.input_name, t.output_name) == (
        spec.input_format,
        spec.input_name,
        spec.output_name,
    )
    assert (t.model_tag, t.max_batch_size) == (spec.model_version_tag, spec.max_batch_size)
    assert settings.milvus.dimension == spec.output_dim
    assert (p.image_size, p.resize_short_side, p.output) == (
        spec.image_size,
        spec.resize_short_side,
        spec.input_format,
    )
    assert (p.mean, p.std) == (spec.input_mean, spec.input_std)
    # Written out and read back (what the stack does with a settings file), it means the same.
    again = Settings(**settings.model_dump(by_alias=True))
    assert (again.model, again.triton, again.preprocess) == (spec, t, p)


def test_today_s_keys_still_mean_what_they_meant(tmp_path: Path) -> None:
    # A settings file of the previous release: the float32 model with its keys written out.
    path = tmp_path / "trident.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "triton": {
                    "model_name": DEFAULT_MODEL_SPEC.name,
                    "input_format": "float32_nchw",
                    "input_name": "images",
                    "output_name": "embedding",
                    "model_tag": DEFAULT_MODEL_SPEC.model_version_tag,
                },
                "milvus": {"dimension": DEFAULT_MODEL_SPEC.output_dim},
                "preprocess": {"image_size": 224, "resize_short_side": 256},
            }
        )
    )
    settings = load_settings(path)
    assert settings.model == DEFAULT_MODEL_SPEC
    assert settings.preprocess.output == "float32_nchw"
    assert Settings().model == UINT8_MODEL_SPEC
    # A model the registry lacks is described by the keys, as every model was before.
    described = Settings(
        triton={"model_name": "their_model", "input_name": "in", "output_name": "out"},
        milvus={"dimension": 512},
        preprocess={"image_size": 192, "resize_short_side": 220},
    )
    model = described.model
    assert (model.family, model.name, model.input_format) == (
        "unregistered",
        "their_model",
        "float32_nchw",
    )
    assert (model.input_name, model.output_dim, model.image_size) == ("in", 512, 192)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"preprocess": {"image_size": 256}}, r"preprocess\.image_size 256 does not fit"),
        (
            {"triton": {"model_name": LITE2_MODEL_SPEC.name}, "preprocess": {"image_size": 224}},
            "whose spec says 260",
        ),
        (
            {
                "triton": {"model_name": LITE1_MODEL_SPEC.name},
                "preprocess": {"resize_short_side": 256},
            },
            r"preprocess\.resize_short_side 256 does not fit",
        ),
        ({"milvus": {"dimension": 512}}, r"milvus\.dimension 512 does not fit"),
        ({"triton": {"model_tag": "mine"}}, r"triton\.model_tag 'mine' does not fit"),
        ({"triton": {"max_batch_size": 128}}, "exceeds"),
        (
            {"triton": {"model_name": LITE2_MODEL_SPEC.name}, "preprocess": {"class": CUSTOM}},
            "takes 'uint8_nhwc' but preprocess.class",
        ),
    ],
    ids=["size", "lite2 size", "resize", "dimension", "tag", "batch", "class"],
)
def test_a_key_that_contradicts_the_named_model_is_an_error_naming_both(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "trident.yaml"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigurationError, match=message):
        load_settings(path)


def test_tensor_names_given_are_what_is_sent_and_what_the_start_checks() -> None:
    # The earlier API's meaning: the names given go on the wire (Triton refuses wrong ones).
    settings = Settings(triton={"model_name": LITE1_MODEL_SPEC.name, "output_name": "pooled"})
    assert settings.triton.output_name == "pooled" and settings.triton.input_name == "images"
    assert settings.model == LITE1_MODEL_SPEC.model_copy(update={"output_name": "pooled"})
    served = [("images", "UINT8", (-1, 240, 240, 3))], [("embedding", "FP32", (-1, 1280))]
    assert tensor_problems(settings.model, *served) == [
        "no output 'pooled' (outputs: ['embedding'])"
    ]


def test_the_model_follows_the_preprocessing_when_not_named() -> None:
    assert Settings(preprocess={"class": CUSTOM}).model == DEFAULT_MODEL_SPEC
    assert Settings(triton={"input_format": "float32_nchw"}).model == DEFAULT_MODEL_SPEC
    # A float32 model takes the preprocessing's own normalisation, as before.
    custom = Settings(
        triton={"model_name": DEFAULT_MODEL_SPEC.name}, preprocess={"mean": (1, 2, 3)}
    )
    assert custom.preprocess.mean == (1, 2, 3) and custom.model == DEFAULT_MODEL_SPEC


def test_a_user_model_in_the_repository_is_named_like_a_built_in_one(repository: Path) -> None:
    settings = Settings(triton={"model_repository": str(repository), "model_name": OWN.name})
    assert settings.model == OWN
    assert settings.triton.input_name == "pixel_values" and settings.milvus.dimension == 64
    assert (
        settings.preprocess.mean == OWN.input_mean and settings.preprocess.output == "float32_nchw"
    )
    assert settings.triton.model_tag == "own-clip-tower-v1"
    # Settings without the repository do not know the name: the earlier way, described by keys.
    assert Settings(triton={"model_name": OWN.name}).model.family == "unregistered"
    with pytest.raises(ModelSpecError, match="not a folder"):
        Settings(triton={"model_repository": str(repository / "nope")})


def test_for_model_rederives_the_model_keys_and_keeps_the_rest(repository: Path) -> None:
    base = Settings(
        triton={"url": "triton:8001", "model_repository": str(repository), "request_timeout_s": 7},
        preprocess={"batch_sizes": (4,), "device": "cpu"},
        milvus={"collection": "photos"},
    )
    lite2 = base.for_model(LITE2_MODEL_SPEC.name)
    assert lite2.model == LITE2_MODEL_SPEC and lite2.preprocess.image_size == 260
    assert (lite2.triton.url, lite2.triton.request_timeout_s) == ("triton:8001", 7)
    assert (lite2.preprocess.batch_sizes, lite2.milvus.collection) == ((4,), "photos")
    own = lite2.for_model(OWN.name)
    assert (own.model, own.milvus.dimension, own.preprocess.std) == (OWN, 64, OWN.input_std)
    assert own.for_model(UINT8_MODEL_SPEC.name).preprocess.mean == UINT8_MODEL_SPEC.input_mean
    with pytest.raises(UnknownModelError, match="own_pixel_model"):
        base.for_model("nope")
    with pytest.raises(ConfigurationError, match="takes 'uint8_nhwc'"):
        Settings(preprocess={"class": CUSTOM}).for_model(LITE1_MODEL_SPEC.name)


def test_the_earlier_config_follows_a_named_model() -> None:
    lite2 = ServiceConfig(triton={"model_name": LITE2_MODEL_SPEC.name}).to_settings()
    assert lite2.model == LITE2_MODEL_SPEC and lite2.milvus.dimension == 1280
    assert lite2.preprocess.image_size == 260 and lite2.triton.model_tag.startswith(
        "efficientnet_lite2"
    )
    theirs = ServiceConfig(triton={"model_name": "theirs", "model_version": "3"}).to_settings()
    assert theirs.triton.model_tag == "theirs:3" and theirs.model.family == "unregistered"


# The preprocessing in every layout -------------------------------------------------------------


def test_the_preprocessing_outputs_each_layout_of_the_same_values() -> None:
    images = [_photo(150, 200, 1), _photo(300, 180, 2)]
    common = {"image_size": 96, "resize_short_side": 110, "batch_sizes": (2,), "device": "cpu"}
    norm = {"mean": OWN.input_mean, "std": OWN.input_std}
    out = {
        fmt: JaxPreprocessor(**common, **norm, output=fmt).preprocess(images)  # type: ignore[arg-type]
        for fmt in ("uint8_nhwc", "uint8_nchw", "float32_nchw", "float32_nhwc")
    }
    assert out["uint8_nhwc"].shape == (2, 96, 96, 3) and out["uint8_nhwc"].dtype == np.uint8
    assert out["float32_nhwc"].shape == (2, 96, 96, 3) and out["float32_nhwc"].dtype == np.float32
    np.testing.assert_array_equal(out["uint8_nchw"], out["uint8_nhwc"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(out["float32_nchw"], out["float32_nhwc"].transpose(0, 3, 1, 2))
    mean = np.asarray(OWN.input_mean, np.float32)
    std = np.asarray(OWN.input_std, np.float32)
    expected = (out["uint8_nhwc"].astype(np.float32) - mean) / std
    np.testing.assert_allclose(out["float32_nhwc"], expected, atol=1e-5)
    reference = reference_pixels(images[1], image_size=96, resize_short_side=110)
    # The kernel's float32 rounding lands a rare pixel one step off Pillow's (as for Lite0's).
    off = np.abs(out["uint8_nhwc"][1].astype(int) - reference)
    assert off.max() <= 1 and np.count_nonzero(off) < 0.001 * off.size


@pytest.mark.parametrize("spec", [OWN, PIXELS, LITE2_MODEL_SPEC], ids=lambda s: s.name)
def test_the_settings_preprocessing_is_the_model_s_input(spec: ModelSpec, repository: Path) -> None:
    settings = Settings(
        triton={"model_repository": str(repository), "model_name": spec.name},
        preprocess={"device": "cpu"},
    )
    preprocessor = build_preprocessor(settings.preprocess, batch_sizes=(1,))
    batch = preprocessor.preprocess([_photo(200, 260)])
    assert batch.shape == (1, *spec.input_dims)
    assert batch.dtype == (np.uint8 if spec.input_dtype == "UINT8" else np.float32)
    assert preprocessor.decode_short_side == spec.resize_short_side
    expected = JaxPreprocessor.for_model(spec, batch_sizes=(1,), device="cpu")
    np.testing.assert_array_equal(batch, expected.preprocess([_photo(200, 260)]))


# A user's ONNX model, checked against its spec and written with it --------------------------


def test_add_writes_the_model_and_its_spec_into_the_repository(repository: Path) -> None:
    files = {p.relative_to(repository).as_posix() for p in repository.rglob("*") if p.is_file()}
    assert {
        f"{OWN.name}/{name}" for name in ("config.pbtxt", MODEL_SPEC_FILE, "1/model.onnx")
    } <= files
    assert f"{OWN.name}/1/model.py" in files  # the python backend, as ours
    config = (repository / OWN.name / "config.pbtxt").read_text()
    assert 'name: "pixel_values", data_type: TYPE_FP32, dims: [ 3, 96, 96 ]' in config
    assert 'name: "feats", data_type: TYPE_FP32, dims: [ 64 ]' in config
    assert load_model_spec_file(repository / OWN.name / MODEL_SPEC_FILE) == OWN
    pixels = (repository / PIXELS.name / "config.pbtxt").read_text()
    assert 'name: "image", data_type: TYPE_UINT8, dims: [ 112, 112, 3 ]' in pixels


@pytest.mark.parametrize("spec", [OWN, PIXELS], ids=lambda s: s.name)
def test_the_written_model_runs_on_the_preprocessing_s_output(
    spec: ModelSpec, repository: Path
) -> None:
    session = onnxruntime.InferenceSession(str(repository / spec.name / "1" / "model.onnx"))
    batch = JaxPreprocessor.for_model(spec, batch_sizes=(2,), device="cpu").preprocess(
        [_photo(120, 160, 3), _photo(160, 120, 4)]
    )
    (vectors,) = session.run([spec.output_name], {spec.input_name: batch})
    assert vectors.shape == (2, spec.output_dim) and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])


def _renamed_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    old = copy.graph.output[0].name
    copy.graph.node[-1].output[0] = name
    copy.graph.output[0].name = name
    assert old != name
    return copy


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: build_model(PIXELS.model_copy(update={"name": OWN.name})), "inputs are ['image']"),
        (
            lambda: build_model(OWN.model_copy(update={"input_format": "float32_nhwc"})),
            "input 'pixel_values' has shape ['batch', 96, 96, 3], "
            "the spec says ['batch', 3, 96, 96]",
        ),
        (
            lambda: build_model(OWN.model_copy(update={"input_format": "uint8_nchw"})),
            "input 'pixel_values' is UINT8, the spec says FP32",
        ),
        (
            lambda: build_model(OWN.model_copy(update={"output_dim": 32})),
            "output 'feats' has shape ['batch', 32], the spec says ['batch', 64]",
        ),
        (lambda: _renamed_output(build_model(OWN), "embeddings"), "no output 'feats'"),
    ],
    ids=["names", "layout", "dtype", "dimension", "output name"],
)
def test_an_onnx_model_unlike_its_spec_is_refused(model: Any, message: str, tmp_path: Path) -> None:
    files = write_files(tmp_path / "files", FLOAT_NCHW, model())
    with pytest.raises(ModelSpecError, match="does not match its spec") as refused:
        add_model(*files, tmp_path / "repository")
    assert message in str(refused.value)
    assert not (tmp_path / "repository" / OWN.name).exists()


def test_a_dimension_the_graph_leaves_open_is_checked_by_running_it(tmp_path: Path) -> None:
    model = build_model(OWN.model_copy(update={"output_dim": 32}))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "D"  # unknown statically
    assert onnx_tensors(model)[1] == [("feats", "FP32", (-1, -1))]
    files = write_files(tmp_path / "files", FLOAT_NCHW, model)
    with pytest.raises(ModelSpecError, match=r"of shape \[2, 32\] .* the spec says \[2, 64\]"):
        add_model(*files, tmp_path / "repository")


def test_the_command_refuses_a_taken_name_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = {**FLOAT_NCHW, "name": LITE2_MODEL_SPEC.name}
    spec_file, onnx_file = write_files(tmp_path / "files", taken, build_model(spec_of(taken)))
    code = main(["add", str(spec_file), str(onnx_file), "--repository", str(tmp_path / "r")])
    assert code == 2
    assert "already taken by a built-in model" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    own_spec, _ = write_files(tmp_path / "own", FLOAT_NCHW, build_model(OWN))
    assert main(["add", str(own_spec), str(bad), "--repository", str(tmp_path / "r")]) == 2
    assert "cannot read ONNX file" in capsys.readouterr().err


def test_adding_a_model_again_replaces_it(repository: Path, tmp_path: Path) -> None:
    changed = {**FLOAT_NCHW, "model_version_tag": "own-clip-tower-v2"}
    add_model(*write_files(tmp_path / "v2", changed, build_model(OWN, seed=8)), repository)
    assert load_model_spec_file(repository / OWN.name / MODEL_SPEC_FILE).model_version_tag == (
        "own-clip-tower-v2"
    )


# The served model is checked against its spec at start --------------------------------------


def test_tensor_problems_accept_open_sizes_and_name_each_difference() -> None:
    fits = [("pixel_values", "FP32", (-1, 3, -1, -1))], [("feats", "FP32", (-1, 64))]
    assert tensor_problems(OWN, *fits) == []
    problems = tensor_problems(
        OWN,
        [("pixel_values", "FP32", (8, 3, 96, 96))],
        [("feats", "FP16", (-1, 64)), ("x", "FP32", (-1,))],
    )
    assert problems == [
        "input 'pixel_values' has shape [8, 3, 96, 96], the spec says ['batch', 3, 96, 96]",
        "output 'feats' is FP16, the spec says FP32",
    ]


class _MetadataClient:
    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self.asked: list[str] = []

    def get_model_metadata(self, name: str, version: str = "", **kwargs: Any) -> dict[str, Any]:
        self.asked.append(name)
        return self.metadata

    def close(self) -> None:
        pass


def test_the_start_up_check_reads_triton_s_metadata() -> None:
    settings = Settings(triton={"model_name": LITE2_MODEL_SPEC.name})
    embedder = TritonEmbedder(settings.triton, model=settings.model)
    # gRPC's JSON writes int64 dims as strings.
    served = {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": ["-1", "260", "260", "3"]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "1280"]}],
    }
    client = _MetadataClient(served)
    embedder._new_client = lambda timeout_s: client  # type: ignore[method-assign]
    embedder.check_model(settings.model)
    assert client.asked == [LITE2_MODEL_SPEC.name]
    served["inputs"][0]["shape"] = ["-1", "224", "224", "3"]  # Lite0 served under Lite2's name
    with pytest.raises(ModelMismatchError, match=r"\['batch', 224, 224, 3\], the spec says"):
        embedder.check_model(settings.model)
    assert issubclass(ModelMismatchError, ConfigurationError)


@pytest.mark.parametrize(
    ("fmt", "batch", "fits"),
    [
        ("uint8_nchw", np.zeros((2, 3, 8, 8), np.uint8), True),
        ("uint8_nchw", np.zeros((2, 8, 8, 3), np.uint8), False),
        ("float32_nhwc", np.zeros((2, 8, 8, 3), np.float32), True),
        ("float32_nhwc", np.zeros((2, 8, 8, 3), np.uint8), False),
    ],
)
def test_the_adapter_takes_every_layout(fmt: str, batch: np.ndarray, fits: bool) -> None:
    triton = TritonSettings.model_validate({"model_name": "anything", "input_format": fmt})
    embedder = TritonEmbedder(triton)
    if fits:
        assert embedder._as_model_input(batch).dtype == batch.dtype
    else:
        with pytest.raises(InferenceConfigurationError, match=f"takes {fmt}"):
            embedder._as_model_input(batch)


# trident-models list ---------------------------------------------------------------------------


def test_list_shows_the_registry_and_says_when_triton_is_unreachable(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "trident.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "triton": {
                    "url": "127.0.0.1:9",
                    "model_repository": str(repository),
                    "model_name": PIXELS.name,
                }
            }
        )
    )
    assert main(["list", "--config", str(config), "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    registry, served = out.split("Served by Triton at 127.0.0.1:9 (grpc):")
    for spec in (*BUILTIN_MODEL_SPECS, OWN):
        assert f"  {spec.name} " in registry or f"* {spec.name} " in registry
    assert f"* {PIXELS.name} " in registry
    assert "UINT8 NHWC 112x112 (resize 112) -> vector[48] tag own-pixel-model-v1" in registry
    assert "UINT8 NHWC 260x260 (resize 297) -> embedding[1280]" in registry
    assert "Triton is unreachable within 2 s" in served
