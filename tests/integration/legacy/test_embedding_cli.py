"""The ``jax-embedding`` command on the real stack (in-process through ``main``, plus the
installed console script), and ``python -m query_api``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from devstack.stack import LocalStack
from engine.settings import Settings
from jax_embedding.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, main
from tests.integration.legacy.conftest import N_IMAGES
from tests.integration.test_items_api import tombstones

pytestmark = pytest.mark.stack


def write_config(path: Path, stack: LocalStack, images: list[Path], **kafka: str) -> Path:
    """The earlier YAML, pointed at the test stack."""
    values = {
        "triton": {"url": stack.config.triton_url, "protocol": "http"},
        "milvus": {
            "host": stack.config.host,
            "port": stack.config.milvus_port,
            "token": stack.milvus.token,
        },
        "kafka": {"bootstrap_servers": stack.config.kafka_bootstrap, **kafka},
        "fetch": {"allowed_roots": [str(images[0].parent)]},
        "preprocess": {"batch_size": 2},
    }
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def config(stack: LocalStack, images: list[Path], tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.yaml", stack, images)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_collections_insert_search_stats_delete(
    config: Path, images: list[Path], collection: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [str(p) for p in images]
    c = ("--config", str(config))
    code, out, err = run(capsys, *c, "collection", "create", "--name", collection, "--dim", "1280")
    assert code == EXIT_OK, err
    assert f"created collection {collection}" in out
    code, out, _ = run(capsys, *c, "collection", "list")
    assert code == EXIT_OK and collection in out.splitlines()

    ids = [f"id{i}" for i in range(N_IMAGES)]
    metadata = json.dumps([{"n": i, "half": "a" if i < 2 else "b"} for i in range(N_IMAGES)])
    code, out, err = run(
        capsys, "insert", *files, "--ids", *ids, "--collection", collection,
        "--metadata", metadata, "--progress", *c,
    )  # fmt: skip
    assert code == EXIT_OK, err
    assert f"inserted {N_IMAGES} images into {collection}" in out
    assert "inserting" in err and f"{N_IMAGES}/{N_IMAGES}" in err  # the progress bar

    code, out, err = run(
        capsys, *c, "search", files[3], "--topk", "3", "--collection", collection, "--json"
    )
    assert code == EXIT_OK, err
    results = json.loads(out)
    assert results[0]["id"] == "id3" and len(results) == 3
    assert results[0]["metadata"] == {"n": 3, "half": "b"}

    code, out, _ = run(
        capsys, *c, "search", files[0], "--collection", collection, "--filter",
        'metadata["half"] == "b"',
    )  # fmt: skip
    assert code == EXIT_OK
    lines = out.splitlines()
    assert len(lines) == N_IMAGES - 2 and lines[0].startswith("1. id")
    assert not any(line.split()[1] in ("id0", "id1") for line in lines)

    code, out, _ = run(capsys, *c, "collection", "stats", "--name", collection)
    stats = json.loads(out)
    assert code == EXIT_OK and stats["row_count"] == N_IMAGES and stats["dimension"] == 1280

    code, out, _ = run(capsys, *c, "collection", "delete", "--name", collection)
    assert code == EXIT_OK and f"deleted collection {collection}" in out
    code, _, err = run(capsys, *c, "collection", "stats", "--name", collection)
    assert code == EXIT_BAD_INPUT and "no collection named" in err


def test_insert_can_create_its_collection_with_metadata_from_a_file(
    config: Path,
    images: list[Path],
    collection: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    metadata = tmp_path / "metadata.json"  # the earlier CLI's form: a JSON file
    metadata.write_text('{"source": "cli"}')
    code, out, err = run(
        capsys, "--config", str(config), "insert", str(images[0]), str(images[1]),
        "--collection", collection, "--create-collection", "--metadata", str(metadata),
    )  # fmt: skip
    assert code == EXIT_OK, err
    assert f"created collection {collection}" in out
    code, out, _ = run(
        capsys, "--config", str(config), "search", str(images[1]), "--collection", collection,
        "--topk", "1", "--json",
    )  # fmt: skip
    assert json.loads(out) == [
        {"id": str(images[1]), "score": pytest.approx(1.0, abs=0.01), "metadata": {"source": "cli"}}
    ]


def test_delete_publishes_deletes_with_the_cli_exit_codes(
    stack: LocalStack,
    images: list[Path],
    collection: str,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp_path = Path(settings.fetch.allowed_roots[0])  # this test's own folder
    topic = settings.kafka.topic
    c = ("--config", str(write_config(tmp_path / "config.yaml", stack, images, topic=topic)))
    code, _, err = run(capsys, *c, "collection", "create", "--name", collection)
    assert code == EXIT_OK, err
    code, out, err = run(capsys, *c, "delete", "cats/1", "dogs/2", "--collection", collection)
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].startswith("cats/1: delete version ") and "partition" in lines[0]
    assert lines[-1].startswith(f"published 2 deletes for {collection} to {topic}")
    code, out, err = run(capsys, *c, "delete", "birds/3", "--collection", collection, "--json")
    assert code == EXIT_OK, err
    [answer] = json.loads(out)
    assert (answer["id"], answer["collection"]) == ("birds/3", collection)
    assert set(tombstones(settings)) == {"cats/1", "dogs/2", "birds/3"}

    code, _, err = run(capsys, *c, "delete", "x", "--collection", "never_made_c1")
    assert code == EXIT_BAD_INPUT and "no collection named 'never_made_c1'" in err
    code, _, err = run(capsys, *c, "delete", "tab\tid", "--collection", collection)
    assert code == EXIT_BAD_INPUT and "cannot be deleted" in err
    with pytest.raises(SystemExit) as exited:
        main(["delete"])  # argparse: at least one id
    assert exited.value.code == EXIT_USAGE
    assert "the following arguments are required: ID" in capsys.readouterr().err
    assert len(tombstones(settings)) == 3  # nothing more was published

    down = write_config(tmp_path / "down.yaml", stack, images, bootstrap_servers="127.0.0.1:9")
    with pytest.MonkeyPatch.context() as patch:  # Kafka down: said after 2 s, not 30
        patch.setattr("jax_embedding.pipeline.PUBLISH_TIMEOUT_S", 2.0)
        code, _, err = run(capsys, "--config", str(down), "delete", "x", "--collection", collection)
    assert code == EXIT_UNAVAILABLE and err.startswith("unavailable: "), err


def test_embed_saves_the_pipeline_embeddings(
    config: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "embeddings.npy"
    files = [str(p) for p in images[:3]]
    code, out, err = run(capsys, "embed", *files, "--output", str(output), "--config", str(config))
    assert code == EXIT_OK, err
    assert f"saved 3 x 1280 embeddings to {output}" in out
    saved = np.load(output)
    assert saved.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)
    code, out, _ = run(capsys, "--config", str(config), "embed", files[1])
    assert code == EXIT_OK and "shape: (1, 1280)" in out
    assert not np.allclose(saved[0], saved[1], atol=0.05)


def test_health_reports_each_service_and_fails_when_one_is_down(
    config: Path, stack: LocalStack, images: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, _ = run(capsys, "health", "--config", str(config))
    assert code == EXIT_OK, out
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert states == {"kafka": "up", "triton": "up", "milvus": "up"}

    with socket.socket() as probe:  # a port nothing listens on: Kafka "down"
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    down = write_config(
        tmp_path / "down.yaml", stack, images, bootstrap_servers=f"127.0.0.1:{closed}"
    )
    code, out, _ = run(capsys, "--config", str(down), "health")
    assert code == EXIT_UNAVAILABLE
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert states == {"kafka": "DOWN", "triton": "up", "milvus": "up"}


def test_errors_are_one_line_with_an_exit_code(
    config: Path, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--config", str(config), "embed", str(tmp_path / "missing.jpg"))
    assert code == EXIT_BAD_INPUT and "config.fetch.allowed_roots" in err  # the pipeline's fix
    code, _, err = run(capsys, "--config", str(config), "embed", str(images[0].parent / "no.jpg"))
    assert code == EXIT_BAD_INPUT and "no.jpg" in err and "No such file" in err
    (tmp_path / "bad.yaml").write_text("milvus:\n  hots: x\n")
    code, _, err = run(capsys, "--config", str(tmp_path / "bad.yaml"), "collection", "list")
    assert code == EXIT_USAGE and "unknown key milvus.hots" in err
    code, _, err = run(capsys, "collection")
    assert code == EXIT_USAGE and "list, create, stats or delete" in err
    code, _, err = run(capsys)
    assert code == EXIT_USAGE and "usage: jax-embedding" in err
    with pytest.raises(SystemExit) as exited:
        main(["search"])  # argparse: the query image is required
    assert exited.value.code == EXIT_USAGE


def test_what_milvus_refuses_is_one_line_without_a_traceback(
    config: Path, images: list[Path], collection: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A process of its own: pymilvus logs a failed call's traceback on its own stderr handler.
    code, _, err = run(
        capsys, "--config", str(config), "collection", "create", "--name", collection
    )
    assert code == EXIT_OK, err
    bad_filter = 'metadata["category" =='
    for argv, message in (
        (["search", str(images[0]), "--collection", collection, "--filter", bad_filter],
         "cannot parse expression"),
        (["collection", "create", "--name", "bad name!"], "invalid collection name 'bad name!'"),
        (["collection", "stats", "--name", "bad name!"], "invalid collection name 'bad name!'"),
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "jax_embedding", "--config", str(config), *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == EXIT_BAD_INPUT, (argv, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
        assert message in done.stderr


def test_the_console_script_is_installed_with_help_everywhere() -> None:
    script = Path(sys.executable).parent / "jax-embedding"
    for argv in ([], ["embed"], ["insert"], ["search"], ["collection"], ["collection", "create"],
                 ["collection", "stats"], ["health"], ["delete"]):  # fmt: skip
        done = subprocess.run(
            [str(script), *argv, "--help"], check=False, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (argv, done.stderr)
        assert done.stdout.startswith(f"usage: jax-embedding {' '.join(argv)}".rstrip())
        assert "--config" in done.stdout


def test_help_and_usage_errors_answer_without_loading_the_engine() -> None:
    # --help is asked often; JAX, pymilvus and tritonclient take seconds to import.
    probe = (
        "import sys\n"
        "from jax_embedding.cli import main\n"
        "for argv in (['search', '--help'], ['insert']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('jax', 'pymilvus', 'tritonclient') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_python_m_query_api_serves_the_api(settings: Settings, stack: LocalStack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings_file = stack.write_settings(settings, name=f"api-{settings.kafka.group_id}.yaml")
    log = settings_file.with_suffix(".log")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "query_api",
                "--config",
                str(settings_file),
                "--port",
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        health = None
        while health is None and time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.5)
        assert health is not None, log.read_text()[-3000:]
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    finally:
        process.terminate()
        process.wait(timeout=60)
