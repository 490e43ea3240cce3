"""``trident-models``: what models can be served, what is served, and adding a model of your own.

``list`` prints the registry (:func:`engine.models.model_registry`: the built-in models and the
user models of ``triton.model_repository``), each with its input, output dimension and vector
tag, marks the model the settings name, then asks Triton (within ``--timeout``) which models it
serves, their state, and whether each registered one matches its spec. Triton not answering is
said in one line (exit status 1); the registry is printed first all the same.

``add SPEC.yaml MODEL.onnx --repository DIR`` serves a model of your own (a CLIP image tower you
exported, say): the spec file holds the :class:`~engine.models.ModelSpec` fields (``name``,
``input_name``, ``input_format``, ``image_size``, ``input_mean``/``input_std``, ``output_name``,
``output_dim``, ``model_version_tag``; ``family`` is ``onnx``). The ONNX file is checked against
it (:func:`check_onnx_model`: one input of the spec's name, dtype and layout, the output's name
and dimension, and a trial batch through onnxruntime when it is installed), then written into the
Triton model repository like the built-in models (python backend running onnxruntime, or
``--backend onnxruntime``), with the spec beside it::

    DIR/<name>/config.pbtxt
    DIR/<name>/trident_model.yaml      the spec (engine.models.MODEL_SPEC_FILE)
    DIR/<name>/1/model.onnx
    DIR/<name>/1/model.py              python backend only

Point the worker and the query API at it with ``triton.model_repository: DIR`` and
``triton.model_name: <name>``: the preprocessing, the collection's dimension and the vector tag
follow from the spec, and both check at start that Triton serves what the spec describes.

Exit status: 0 success; 1 Triton unreachable (``list``); 2 the command cannot run (bad
arguments, settings, spec or ONNX file).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from engine.cli_support import add_common_arguments, settings_from_arguments
from engine.errors import (
    ConfigurationError,
    InferenceConfigurationError,
    InferenceUnavailableError,
    ModelSpecError,
)
from engine.inference import TritonEmbedder
from engine.models import (
    MODEL_SPEC_FILE,
    ModelSpec,
    TensorDescription,
    dump_model_spec,
    input_is_pixels,
    load_model_spec_file,
    model_registry,
    repository_model_specs,
    tensor_problems,
)
from engine.settings import Settings
from model_build.triton_repository import Backend, write_model_repository

logger = logging.getLogger(__name__)

# ONNX element types by Triton's data type names (the ones a model's tensors may have).
_TRITON_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
}
_TRIAL_ROWS = 2
_DEFAULT_TIMEOUT_S = 5.0


def onnx_tensors(
    model: onnx.ModelProto,
) -> tuple[list[TensorDescription], list[TensorDescription]]:
    """The graph's real inputs (initializers left out) and outputs: name, Triton data type,
    shape (``-1`` for a symbolic or unknown dimension)."""
    initializers = {init.name for init in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> TensorDescription:
        tensor = value.type.tensor_type
        elem_type = int(tensor.elem_type)
        dtype = _TRITON_DTYPES.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type)
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return value.name, dtype, dims

    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in model.graph.output]


def check_onnx_model(spec: ModelSpec, model: onnx.ModelProto) -> None:
    """Return when ``model`` is what ``spec`` describes and can be served as such.

    Checks the ONNX checker's rules, the tensors (:func:`engine.models.tensor_problems`: one
    input of the spec's name, dtype and layout, a batch dimension, the output's name, dtype and
    dimension), then, when onnxruntime is installed, runs a trial batch and checks the output's
    shape and that it is finite (a dimension the graph leaves symbolic is checked there).

    Raises:
        ModelSpecError: it is not; the message lists every difference.
    """
    where = f"ONNX model for {spec.name!r}"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelSpecError(f"{where} is not a valid ONNX model: {exc}") from exc
    problems = tensor_problems(spec, *onnx_tensors(model))
    if problems:
        raise ModelSpecError(f"{where} does not match its spec: {'; '.join(problems)}")
    try:
        import onnxruntime  # noqa: PLC0415 (optional: a dev and Triton dependency)
    except ImportError:
        logger.warning("onnxruntime is not installed: the model was not run once to check it")
        return
    _trial_run(spec, model, onnxruntime, where)


def _trial_run(spec: ModelSpec, model: onnx.ModelProto, onnxruntime: Any, where: str) -> None:
    rng = np.random.default_rng(0)
    shape = (_TRIAL_ROWS, *spec.input_dims)
    if input_is_pixels(spec.input_format):
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        batch = rng.standard_normal(shape).astype(np.float32)
    try:
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        output = session.run([spec.output_name], {spec.input_name: batch})[0]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelSpecError(f"{where} does not run on a {list(shape)} batch: {exc}") from exc
    if output.shape != (_TRIAL_ROWS, spec.output_dim):
        raise ModelSpecError(
            f"{where} returned {spec.output_name!r} of shape {list(output.shape)} for "
            f"{_TRIAL_ROWS} images; the spec says [{_TRIAL_ROWS}, {spec.output_dim}]"
        )
    if not np.isfinite(output).all():
        raise ModelSpecError(f"{where} returned non-finite values for a trial batch")


def add_model(
    spec_file: Path, onnx_file: Path, repository: Path, *, backend: Backend = "python"
) -> Path:
    """Check a user's ONNX model against its spec file and write both into a Triton model
    repository (``<repository>/<name>/``, the spec as :data:`~engine.models.MODEL_SPEC_FILE`).

    Adding a model of the same name again replaces it (files left untouched when unchanged).

    Returns:
        The model's folder.

    Raises:
        ModelSpecError: the spec file is invalid, is not of family ``onnx``, takes a name the
            registry has (a built-in model or another spec), or the ONNX file does not match it.
        OSError: a file cannot be read or written.
    """
    spec = load_model_spec_file(spec_file)
    if spec.family != "onnx":
        raise ModelSpecError(
            f"{spec_file}: family {spec.family!r}; a model added from an ONNX file is 'onnx'"
        )
    others = repository_model_specs(repository) if repository.is_dir() else []
    model_registry([*(o for o in others if o.name != spec.name), spec])  # a name taken: raises
    try:
        model = onnx.load(str(onnx_file))
    except (OSError, DecodeError, ValueError) as exc:
        raise ModelSpecError(f"cannot read ONNX file {onnx_file}: {exc}") from exc
    check_onnx_model(spec, model)
    folder = write_model_repository(
        repository,
        spec,
        backend=backend,
        model=model,
        extra_files={MODEL_SPEC_FILE: dump_model_spec(spec).encode()},
    )
    logger.info("model %s written to %s", spec.name, folder)
    return folder


# Listing -------------------------------------------------------------------------------------


def registry_lines(settings: Settings) -> list[str]:
    """The registry, one model a line, the settings' model marked with ``*``."""
    registry = settings.triton.registry()
    chosen = settings.model
    if chosen.name not in registry:
        registry[chosen.name] = chosen  # an unregistered model, described by the settings
    width = max(len(name) for name in registry)
    lines = []
    for name, spec in registry.items():
        mark = "*" if name == chosen.name else " "
        lines.append(f"{mark} {name:<{width}}  {spec.family:<17} {spec.summary()}")
    return lines


def served_lines(settings: Settings, timeout_s: float) -> list[str]:
    """What Triton serves, its state and, for a registered model, whether it fits its spec.

    Raises:
        InferenceUnavailableError: Triton did not answer within ``timeout_s``.
    """
    registry = settings.triton.registry()
    registry.setdefault(settings.model.name, settings.model)
    served = TritonEmbedder(settings.triton).served_models(timeout_s)
    width = max((len(name) for name in served), default=0)
    lines = []
    for name, state in sorted(served.items()):
        spec = registry.get(name)
        if spec is None:
            verdict = "not in the registry"
        elif not state.startswith("READY"):
            verdict = "in the registry"
        else:
            verdict = _verdict(settings, spec, timeout_s)
        lines.append(f"  {name:<{width}}  {state:<12} {verdict}")
    return lines or ["  (none)"]


def _verdict(settings: Settings, spec: ModelSpec, timeout_s: float) -> str:
    # Only the name changes: the metadata question needs the address, protocol and name.
    triton = settings.triton.model_copy(update={"model_name": spec.name, "model_version": ""})
    try:
        inputs, outputs = TritonEmbedder(triton).served_tensors(timeout_s)
    except (InferenceUnavailableError, InferenceConfigurationError) as exc:
        return f"metadata unavailable: {exc}"
    problems = tensor_problems(spec, inputs, outputs)
    return "matches its spec" if not problems else f"DIFFERS from its spec: {'; '.join(problems)}"


def run_list(settings: Settings, timeout_s: float) -> int:
    """Print the registry and what Triton serves; the exit status."""
    where = settings.triton.model_repository or "none (triton.model_repository)"
    print(f"Models that can be served (user models from: {where}):")
    for line in registry_lines(settings):
        print(line)
    print("  (* the model the settings name: triton.model_name)")
    t = settings.triton
    print(f"\nServed by Triton at {t.url} ({t.protocol}):")
    try:
        lines = served_lines(settings, timeout_s)
    except InferenceUnavailableError as exc:
        print(f"  Triton is unreachable within {timeout_s:g} s: {exc}")
        print("  (start it, e.g. `make up` for the local stack, or point triton.url at it)")
        return 1
    for line in lines:
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line ``trident-models``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="trident-models", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="What can be served, and what Triton serves.")
    add_common_arguments(listing)
    listing.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULT_TIMEOUT_S,
        help="Seconds to wait for Triton's answer (default %(default)s).",
    )
    adding = commands.add_parser("add", help="Serve an ONNX model of your own.")
    adding.add_argument("spec", type=Path, help="The model's spec file (YAML).")
    adding.add_argument("onnx", type=Path, help="The model (ONNX).")
    adding.add_argument(
        "--repository", type=Path, required=True, help="The Triton model repository folder."
    )
    adding.add_argument("--backend", choices=get_args(Backend), default="python")
    adding.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return run_list(settings_from_arguments(args), args.timeout)
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s")
        folder = add_model(args.spec, args.onnx, args.repository, backend=args.backend)
    except (ConfigurationError, OSError) as exc:
        print(f"trident-models: {exc}", file=sys.stderr)
        return 2
    spec = load_model_spec_file(folder / MODEL_SPEC_FILE)
    print(f"{folder}\n  {spec.summary()}")
    print(
        f"Serve it: restart Triton on {args.repository}, then set triton.model_repository: "
        f"{args.repository} and triton.model_name: {spec.name}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
