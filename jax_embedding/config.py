"""``ServiceConfig``: the earlier pipeline's configuration, read as its users wrote it.

The legacy API's own settings loader, and the one place the earlier environment variables are
read (core classes never read the environment). Sources, later ones winning: defaults (the local
quick-start stack), the earlier environment variables (``TRITON_URL``, ``MILVUS_PORT``, ... see
:data:`ENVIRONMENT`), then a YAML file given to :meth:`ServiceConfig.from_yaml`, then attributes
set afterwards (``config.preprocess.use_gpu = True``; validated on assignment).

Every key is checked: an unknown key or a bad value raises :class:`ConfigurationError` naming
it. :meth:`ServiceConfig.to_settings` maps the whole thing onto the project's
:class:`engine.settings.Settings`, in one place. ``TRIDENT_*`` variables do not apply there
(``Settings(...)`` built in code never reads the environment): this configuration is the whole
of the pipeline's, so a variable set for the worker cannot silently change what a script does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import ConfigurationError
from engine.indexes import IndexType, Metric, build_parameter_names, search_parameter_names
from engine.models import DEFAULT_MODEL_SPEC, PREPROCESS_BATCH_SIZES, model_registry
from engine.preprocess import MODEL_MEAN, MODEL_STD
from engine.records import VECTOR_FIELD
from engine.settings import Settings, merged_sections, read_yaml_mapping
from jax_embedding.triton_client import TRITON_PORTS

logger = logging.getLogger(__name__)

# Earlier environment variable -> (section, key).
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "TRITON_URL": ("triton", "url"),
    "TRITON_MODEL_NAME": ("triton", "model_name"),
    "TRITON_MODEL_VERSION": ("triton", "model_version"),
    "TRITON_PROTOCOL": ("triton", "protocol"),
    "TRITON_INPUT_NAME": ("triton", "input_name"),
    "TRITON_OUTPUT_NAME": ("triton", "output_name"),
    "MILVUS_HOST": ("milvus", "host"),
    "MILVUS_PORT": ("milvus", "port"),
    "MILVUS_COLLECTION_NAME": ("milvus", "collection_name"),
    "MILVUS_EMBEDDING_DIM": ("milvus", "embedding_dim"),
    "MILVUS_TOKEN": ("milvus", "token"),
    "JAX_USE_GPU": ("preprocess", "use_gpu"),
    "JAX_PLATFORM": ("preprocess", "jax_platform"),
}


class _Section(BaseModel):
    """Strict keys, validated assignment, and the project's error type for both."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc, prefix=self._prefix())) from exc

    def _prefix(self) -> str:
        return ""


class TritonConfig(_Section):
    url: str | None = Field(None, description="host:port; default: the local stack's port.")
    model_name: str = DEFAULT_MODEL_SPEC.name
    model_version: str = ""
    protocol: Literal["http", "grpc"] = "http"
    input_name: str = DEFAULT_MODEL_SPEC.input_name
    output_name: str = DEFAULT_MODEL_SPEC.output_name
    timeout: float = Field(30.0, gt=0, description="Seconds per request.")

    def _prefix(self) -> str:
        return "triton."

    def address(self) -> str:
        return self.url or f"127.0.0.1:{TRITON_PORTS[self.protocol]}"


class MilvusConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(19530, ge=1, le=65535)
    collection_name: str = "images"
    embedding_dim: int = Field(DEFAULT_MODEL_SPEC.output_dim, ge=1)
    vector_field: str = VECTOR_FIELD
    index_type: IndexType = "HNSW"
    metric_type: Metric = "COSINE"
    # Each index type uses its own; the others are ignored (earlier files list them all).
    nlist: int | None = None
    nprobe: int | None = None
    M: int | None = None
    efConstruction: int | None = None  # noqa: N815 (the earlier key)
    ef: int | None = None
    token: str = ""
    user: str = ""
    password: str = ""
    timeout: float = Field(30.0, gt=0, description="Seconds per request (new here).")

    def _prefix(self) -> str:
        return "milvus."


class PreprocessConfig(_Section):
    image_size: int | tuple[int, int] = (
        DEFAULT_MODEL_SPEC.image_size,
        DEFAULT_MODEL_SPEC.image_size,
    )
    batch_size: int = Field(32, ge=1, le=256)
    use_gpu: bool = False
    jax_platform: Literal["cpu", "gpu"] | None = None
    mean: tuple[float, float, float] = Field(MODEL_MEAN, description="0-1 scale, per RGB.")
    std: tuple[float, float, float] = Field(MODEL_STD, description="0-1 scale, per RGB.")
    data_format: Literal["NCHW"] = Field("NCHW", description="The model's layout; the only one.")
    num_workers: int = Field(8, ge=1, description="Images fetched at once.")

    def _prefix(self) -> str:
        return "preprocess."


class FetchConfig(_Section):
    """Which local paths and URLs the pipeline may read (the worker's fetch safety)."""

    allowed_roots: list[Path] = Field(default_factory=lambda: [Path.cwd()])
    allow_private_addresses: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)

    def _prefix(self) -> str:
        return "fetch."


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = Field("trident.ingest", description="Where delete_images publishes deletes.")

    def _prefix(self) -> str:
        return "kafka."


class ServiceConfig(_Section):
    """The earlier pipeline's configuration: ``triton``, ``milvus`` and ``preprocess`` (plus
    ``fetch`` and ``kafka``, new here). ``ServiceConfig()`` reads the earlier environment
    variables over the defaults.

    Raises (on construction):
        ConfigurationError: an unknown key or an invalid value, named.
    """

    triton: TritonConfig = Field(default_factory=TritonConfig)
    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    log_level: str = Field("WARNING", description="The jax-embedding command's log level.")
    cache_compiled_functions: bool = Field(
        False, description="Compile every preprocessing batch shape when a pipeline starts."
    )

    def __init__(self, **values: Any) -> None:
        environment = _from_environment()
        try:
            super().__init__(**merged_sections(environment, values))
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc, environment=environment)) from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """The file's values over the environment's over the defaults.

        Raises:
            ConfigurationError: the file cannot be read, is not a mapping, or has an unknown key
                or invalid value (named, with the file).
        """
        loaded = read_yaml_mapping(path, "config file")
        try:
            return cls(**loaded)
        except ConfigurationError as exc:
            raise ConfigurationError(f"config file {path}: {exc}") from exc

    @classmethod
    def from_env(cls) -> Self:
        """The earlier constructor's name for ``ServiceConfig()``."""
        return cls()

    def to_settings(self) -> Settings:
        """The project's settings for this configuration.

        Raises:
            ConfigurationError: the combination is invalid (e.g. an index parameter out of
                range, named; a non-square image size).
        """
        triton, milvus, pre = self.triton, self.milvus, self.preprocess
        if milvus.vector_field != VECTOR_FIELD:
            logger.warning(
                "milvus.vector_field %r is not used: collections here keep vectors in %r",
                milvus.vector_field,
                VECTOR_FIELD,
            )
        side = _square_side(pre.image_size)
        # The named model's spec decides its tensors, sizes, normalisation, dimension and tag:
        # only what this configuration says explicitly is passed on (and must fit the spec).
        # An unregistered model is described by every key, defaults included, as before.
        registered = triton.model_name in model_registry()
        spec_or_default = model_registry().get(triton.model_name, DEFAULT_MODEL_SPEC)

        def given(section: _Section, *keys: str) -> bool:
            return not registered or bool(set(keys) & section.model_fields_set)

        values: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.kafka.bootstrap_servers, "topic": self.kafka.topic},
            "triton": {
                "url": triton.address(),
                "protocol": triton.protocol,
                "model_name": triton.model_name,
                "model_version": triton.model_version,
                "request_timeout_s": triton.timeout,
                **({"input_name": triton.input_name} if given(triton, "input_name") else {}),
                **({"output_name": triton.output_name} if given(triton, "output_name") else {}),
                # Vectors carry the model they came from; another model must not pass as ours.
                **({} if registered else {"model_tag": _model_tag(triton)}),
            },
            "milvus": {
                "uri": f"http://{milvus.host}:{milvus.port}",
                "token": milvus.token or _user_token(milvus),
                "collection": milvus.collection_name,
                "timeout_s": milvus.timeout,
                **({"dimension": milvus.embedding_dim} if given(milvus, "embedding_dim") else {}),
                "metric": milvus.metric_type,
                "index_type": milvus.index_type,
                **_index_parameters(milvus),
            },
            "fetch": {
                "allowed_roots": self.fetch.allowed_roots,
                "allow_private_addresses": self.fetch.allow_private_addresses,
                "allowed_hosts": self.fetch.allowed_hosts,
                "concurrency": pre.num_workers,
            },
            "preprocess": {
                "device": "auto" if pre.use_gpu and pre.jax_platform != "cpu" else "cpu",
                "batch_sizes": _batch_sizes(pre.batch_size),
                **(
                    {
                        "image_size": side,
                        "resize_short_side": spec_or_default.resize_short_side_for(side),
                    }
                    if given(pre, "image_size")
                    else {}
                ),
                **(
                    {
                        "mean": tuple(m * 255 for m in pre.mean),
                        "std": tuple(s * 255 for s in pre.std),
                    }
                    if given(pre, "mean", "std")
                    else {}
                ),
            },
            "batch": {"max_size": pre.batch_size},
        }
        try:
            return Settings(**values)
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc)) from exc


def _from_environment() -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for variable, (section, key) in ENVIRONMENT.items():
        value = os.environ.get(variable)
        if value:
            found.setdefault(section, {})[key] = value
    return found


def _explain(
    exc: ValidationError, *, prefix: str = "", environment: dict[str, dict[str, str]] | None = None
) -> str:
    """One line per problem, naming the key (and the environment variable it came from)."""
    origin = {f"{s}.{k}": v for v, (s, k) in ENVIRONMENT.items()}
    lines = []
    for error in exc.errors():
        key = prefix + ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        if not key:  # the settings as a whole (a model that does not fit, named in the text)
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        if error["type"] in ("extra_forbidden", "no_such_attribute"):
            lines.append(f"unknown key {key}")
            continue
        source = ""
        section, _, name = key.partition(".")
        if environment and name in environment.get(section, {}):
            source = f" (from environment variable {origin[key]})"
        lines.append(f"invalid {key}{source}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(lines)


def _square_side(size: int | tuple[int, int]) -> int:
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ConfigurationError(
            f"preprocess.image_size must be square for the built-in preprocessing, got {size}"
        )
    return height


def _batch_sizes(batch_size: int) -> tuple[int, ...]:
    return (*(size for size in PREPROCESS_BATCH_SIZES if size < batch_size), batch_size)


def _user_token(milvus: MilvusConfig) -> str:
    return f"{milvus.user}:{milvus.password}" if milvus.user else ""


def _model_tag(triton: TritonConfig) -> str:
    """An unregistered model's vector tag: its name and version."""
    return f"{triton.model_name}:{triton.model_version or 'latest'}"


def _index_parameters(milvus: MilvusConfig) -> dict[str, dict[str, int]]:
    # The parameters the index type takes, and their ranges, are engine.indexes'.
    def chosen(names: tuple[str, ...]) -> dict[str, int]:
        values = {name: getattr(milvus, name) for name in names}
        return {name: value for name, value in values.items() if value is not None}

    return {
        "index_params": chosen(build_parameter_names(milvus.index_type)),
        "search_params": chosen(search_parameter_names(milvus.index_type)),
    }
