"""Kafka unreachable: the commands say so in one line and exit 1 within their deadline, and the
clients' own reports of a failure go through logging once per kind, not once per reconnect."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from PIL import Image

from engine.kafka import ClientLog

REPO = Path(__file__).resolve().parents[2]
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
CONNECT_TIMEOUT_S = 2


def run_command(module: str, *args: str) -> tuple[int, list[str], list[str], float]:
    """Run ``python -m module args`` against the closed port; (status, stdout, stderr, seconds)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRIDENT_")}
    environment |= {
        "TRIDENT_KAFKA__BOOTSTRAP_SERVERS": CLOSED,
        "TRIDENT_KAFKA__CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=environment,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (
        result.returncode,
        result.stdout.splitlines(),
        result.stderr.splitlines(),
        time.monotonic() - started,
    )


def assert_one_line_about_the_broker(stderr: list[str]) -> None:
    assert len(stderr) == 1, stderr
    (line,) = stderr
    assert f"Kafka at {CLOSED} did not answer within {CONNECT_TIMEOUT_S}s" in line
    assert "Connection refused" in line and "kafka.bootstrap_servers" in line
    assert "librdkafka" not in line and "Traceback" not in line


def test_trident_produce_says_kafka_is_unreachable_once_and_exits_1(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    status, stdout, stderr, seconds = run_command("producer.cli", str(image))
    assert status == 1
    assert_one_line_about_the_broker(stderr)
    assert stdout == [stdout[0]] and stdout[0].startswith("delivered=0 not_sent=1 "), stdout
    assert "(Kafka unreachable)" in stdout[0]
    assert seconds < 30  # the connect timeout and start-up, not librdkafka's 120 s


@pytest.mark.parametrize(
    ("args", "summary"),
    [
        (["inspect"], "dead-letter topic trident.ingest.dlq: not read (Kafka unavailable)"),
        (["replay", "--reason", "not_found"], "replay incomplete (Kafka unavailable)"),
    ],
)
def test_trident_dlq_says_kafka_is_unreachable_once_and_exits_1(
    args: list[str], summary: str
) -> None:
    status, stdout, stderr, seconds = run_command("producer.dlq_cli", *args)
    assert status == 1
    assert_one_line_about_the_broker(stderr)
    assert len(stdout) == 1 and stdout[0].startswith(summary), stdout
    assert seconds < 30


def test_client_reports_are_logged_once_per_kind_and_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    target = logging.getLogger("test.librdkafka")
    log = ClientLog(target, window_s=60.0, clock=lambda: now[0])
    fmt = "%s [%s] %s"
    refused = "[thrd:h:1/bootstrap]: h:1/bootstrap: Connect to ipv4#h:1 failed: Connection refused"
    with caplog.at_level(logging.DEBUG, logger="test.librdkafka"):
        for attempt in range(50):  # a reconnect every 0.2 s for 10 s
            log.log(
                logging.ERROR, fmt, "FAIL", "rdkafka#producer-1", f"{refused} (after {attempt}ms)"
            )
            log.error(
                KafkaError(
                    KafkaError._TRANSPORT,
                    f"{refused.split(']: ')[1]} (after {attempt}ms)",
                )
            )
            log.error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
            now[0] += 0.2
        log.log(logging.DEBUG, fmt, "BROKER", "rdkafka#producer-1", "debug lines pass")
        log.log(logging.DEBUG, fmt, "BROKER", "rdkafka#producer-1", "debug lines pass")
        now[0] = 75.0
        log.log(logging.ERROR, fmt, "FAIL", "rdkafka#producer-1", f"{refused} (after 3ms)")
        log.error(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    # The refused connection once (its log line and error event are one kind), the brokers
    # down once, both debug lines, then the same failure after the window with its count.
    assert [level for level, _ in lines] == [
        logging.WARNING,
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.WARNING,
        logging.ERROR,
    ], lines
    assert "Connection refused" in lines[0][1] and "brokers are down" in lines[1][1]
    # 49 more log lines and 50 error events of that kind.
    assert lines[4][1].endswith("(after 3ms) (and 99 more like it in 75s)"), lines[4]
    assert "fenced" in lines[5][1]
