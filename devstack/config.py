"""Where the local stack keeps its files and which loopback ports it uses."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class StackConfig(BaseModel):
    """Settings of the local development/test stack (all servers on loopback)."""

    root: Path = Field(
        Path(".stack"), description="Git-ignored folder for data, logs and pid files."
    )
    cache: Path | None = Field(
        None,
        description="Folder for what installs take long to make (venvs, jars); shared by several "
        "stacks, e.g. the quick start's and the tests'. Default: <root>/cache.",
    )
    host: str = "127.0.0.1"
    python: str = Field("python3", description="Interpreter used to create the service venvs.")

    kafka_version: str = "4.1.0"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    kafka_heap: str = "512m"

    triton_http_port: int = 18000
    triton_grpc_port: int = 18001
    triton_metrics_port: int = 18002

    milvus_port: int = 19530

    @classmethod
    def test_stack(cls, root: Path, cache: Path, offset: int = 0) -> StackConfig:
        """A test stack's settings: its data in ``root``, the installs shared from ``cache``,
        and every port the tests' (Kafka 29092, Triton 28000-28002, Milvus 29530) moved by
        ``offset``, so several stacks share one machine beside the quick start's."""
        return cls(
            root=root,
            cache=cache,
            kafka_port=29092 + offset,
            kafka_controller_port=29093 + offset,
            triton_http_port=28000 + offset,
            triton_grpc_port=28001 + offset,
            triton_metrics_port=28002 + offset,
            milvus_port=29530 + offset,
        )

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def triton_url(self) -> str:
        return f"{self.host}:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"

    @property
    def milvus_uri(self) -> str:
        return f"http://{self.host}:{self.milvus_port}"

    def cache_folder(self, service: str) -> Path:
        """The service's install folder (venv, jars, binaries), created on demand."""
        path = (self.cache or self.root / "cache").resolve() / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def folder(self, service: str) -> Path:
        """The service's own folder under the stack root (created on demand)."""
        path = self.root.resolve() / service
        path.mkdir(parents=True, exist_ok=True)
        return path
