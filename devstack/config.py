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
