"""What ``trident-produce`` turns into events: folders, globs, list files, manifests, ids.

These need no Kafka (``--dry-run`` and the entry builders); publishing itself is tested on the
real stack (tests/integration/test_producer_tools.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from PIL import Image

from engine.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    EntryError,
    EventTooLargeError,
    PermanentError,
    Reason,
    SourceError,
)
from producer.cli import main as produce
from producer.publisher import delivery_error, stable_id
from producer.sources import (
    DeleteEntry,
    EventOptions,
    build_delete,
    build_event,
    gather,
    gather_deletes,
)
from schemas import EventLimits


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("cats/a.png", "cats/b.jpg", "dogs/c.png", "top.png", "thumbs/t.png"):
        _image(tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path / "images"


def _built(entries: list, options: EventOptions) -> dict[str, dict]:
    return {(e := build_event(entry, options)).id: e.metadata for entry in entries}


def test_folders_are_walked_with_include_and_exclude_and_ids_relative_to_the_folder(
    tree: Path,
) -> None:
    options = EventOptions(exclude=("thumbs/*",), id_prefix="set1/")
    events = _built(gather([str(tree)], options), options)
    assert sorted(events) == [
        "set1/cats/a.png",
        "set1/cats/b.jpg",
        "set1/dogs/c.png",
        "set1/top.png",
    ]
    assert events["set1/cats/a.png"]["category"] == "cats"
    assert "category" not in events["set1/top.png"]

    only_png = EventOptions(include=("*.png",), exclude=("thumbs/*", "dogs/*"))
    assert sorted(_built(gather([str(tree)], only_png), only_png)) == ["cats/a.png", "top.png"]


def test_globs_urls_and_missing_paths(tree: Path) -> None:
    options = EventOptions()
    entries = gather(
        [f"{tree}/**/*.jpg", "https://example.org/x.jpg", f"{tree}/nothing/*.png", "absent.png"],
        options,
    )
    assert build_event(entries[0], options).id == str(tree / "cats" / "b.jpg")
    assert build_event(entries[1], options).id == "https://example.org/x.jpg"
    for entry, problem in ((entries[2], "no file matches"), (entries[3], "no such file")):
        with pytest.raises(EntryError, match=problem):
            build_event(entry, options)
    assert len(entries) == 4


def test_list_file_lines_are_relative_to_the_list_and_bad_lines_name_their_number(
    tree: Path,
) -> None:
    listing = tree.parent / "list.txt"
    listing.write_text("# a comment\nimages/top.png\n\nimages/missing.png\nimages/dogs\n")
    options = EventOptions()
    entries = gather([], options, list_files=[listing])
    assert build_event(entries[0], options).id == "images/top.png"
    with pytest.raises(EntryError, match=r"list.txt:4: no such file"):
        build_event(entries[1], options)
    assert build_event(entries[2], options).id == "c.png"  # walked folder: relative to it
    assert len(entries) == 3


def test_jsonl_manifest_ids_metadata_collection_and_bad_lines(tree: Path) -> None:
    manifest = tree.parent / "m.jsonl"
    manifest.write_text(
        '{"id": "a", "source": "images/top.png", "metadata": {"n": 1}, "label": "x"}\n'
        "{not json\n"
        "\n"
        '{"source": "images/cats/a.png", "collection": "pets"}\n'
        '{"id": "no-source"}\n'
        '["an", "array"]\n'
        '{"id": 7, "source": "images/top.png"}\n'
        '{"source": "https://example.org/u.jpg", "metadata": {"n": NaN}}\n'
    )
    options = EventOptions(metadata={"label": "default", "batch": "b1"})
    entries = gather([], options, manifests=[manifest])
    outcomes: dict[str, object] = {}
    for entry in entries:
        try:
            outcomes[entry.origin] = build_event(entry, options)
        except EntryError as exc:
            outcomes[entry.origin] = str(exc)
    first = outcomes[f"{manifest}:1"]
    assert not isinstance(first, str)
    assert first.id == "a"
    assert first.metadata["n"] == 1
    assert first.metadata["label"] == "x"  # the manifest's value wins over --metadata
    assert first.metadata["batch"] == "b1"
    assert "not valid JSON" in str(outcomes[f"{manifest}:2"])
    fourth = outcomes[f"{manifest}:4"]
    assert not isinstance(fourth, str)
    assert (fourth.id, fourth.collection) == ("images/cats/a.png", "pets")
    assert "no source" in str(outcomes[f"{manifest}:5"])
    assert "JSON object" in str(outcomes[f"{manifest}:6"])
    assert "id must be a string" in str(outcomes[f"{manifest}:7"])
    assert "not valid JSON" in str(outcomes[f"{manifest}:8"])  # NaN is not JSON
    assert len(entries) == 7  # the blank line 3 is no entry


def test_csv_manifest_columns_and_bad_lines(tree: Path) -> None:
    manifest = tree.parent / "m.csv"
    manifest.write_text(
        "id,source,label,metadata\n"
        'c1,images/top.png,cat,"{""n"": 2}"\n'
        "c2,,dog,\n"
        "c3,images/dogs/c.png,,\n"
        "c4,images/top.png,x,{broken\n"
        "c5,images/top.png,x,,extra-cell\n"
    )
    options = EventOptions(generate_ids=True)
    entries = gather([], options, manifests=[manifest])
    first = build_event(entries[0], options)
    assert (first.id, first.metadata["label"], first.metadata["n"]) == ("c1", "cat", 2)
    third = build_event(entries[2], options)
    assert third.id == "c3"
    assert "label" not in third.metadata  # empty cells are left out
    for entry, line, problem in (
        (entries[1], 3, "no source"),
        (entries[3], 5, "the metadata cell is not valid JSON"),
        (entries[4], 6, "more cells"),
    ):
        with pytest.raises(EntryError, match=f"m.csv:{line}: {problem}"):
            build_event(entry, options)


def test_generated_ids_are_used_only_where_the_manifest_gives_none(tree: Path) -> None:
    manifest = tree.parent / "m.jsonl"
    manifest.write_text(
        '{"source": "images/top.png"}\n{"id": "kept", "source": "images/top.png"}\n'
    )
    options = EventOptions(generate_ids=True)
    first, second = (build_event(e, options) for e in gather([], options, manifests=[manifest]))
    assert len(first.id) == 32
    assert first.id != "images/top.png"
    assert second.id == "kept"


def test_unreadable_manifests_are_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        gather([], EventOptions(), manifests=[tmp_path / "absent.jsonl"])
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(SourceError, match=r"\.jsonl"):
        gather([], EventOptions(), manifests=[tmp_path / "m.txt"])
    (tmp_path / "m.csv").write_text("id,path\na,b\n")
    with pytest.raises(SourceError, match="'source' column"):
        gather([], EventOptions(), manifests=[tmp_path / "m.csv"])


def test_inline_files_over_the_bound_are_refused_before_they_are_read(tree: Path) -> None:
    options = EventOptions(inline=True, limits=EventLimits(inline_image_max_bytes=50))
    (entry,) = gather([str(tree / "top.png")], options)
    with pytest.raises(EntryError, match=r"inline_image_max_bytes=50.*reference"):
        build_event(entry, options)


def test_long_path_ids_are_hashed_within_the_byte_limit() -> None:
    assert stable_id("short") == "short"
    hashed = stable_id("é" * 200)  # 400 bytes
    assert hashed.startswith("sha256:")
    assert len(hashed.encode()) <= 256


def test_kafka_errors_are_translated_into_the_error_tree() -> None:
    too_large = delivery_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), 2_000_000)
    assert isinstance(too_large, EventTooLargeError)
    assert isinstance(too_large, PermanentError)
    assert "2000000 bytes" in str(too_large)
    assert "reference" in str(too_large)
    assert isinstance(delivery_error(KafkaError(KafkaError._MSG_TIMED_OUT)), BrokerUnavailableError)
    # The deployment is wrong, not the event; the reason is a Reason member, not librdkafka's.
    refused = delivery_error(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    assert isinstance(refused, ConfigurationError)
    assert refused.reason == Reason.KAFKA_NOT_AUTHORIZED


def test_dry_run_validates_counts_and_exits_by_the_outcome(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.yaml"
    # An unreachable broker: a dry run must not need Kafka.
    config.write_text("kafka: {bootstrap_servers: '127.0.0.1:9'}\n")
    assert produce(["--config", str(config), "--dry-run", str(tree)]) == 0
    assert "dry run, nothing published: valid=5 invalid=0" in capsys.readouterr().out

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"source": "images/top.png"}\n{oops\n')
    assert produce(["--config", str(config), "--dry-run", "--manifest", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "valid=1 invalid=1" in out
    assert f"{manifest}:2: not valid JSON" in out

    assert produce(["--config", str(config), "--dry-run", "--manifest", "absent.csv"]) == 2
    with pytest.raises(SystemExit) as usage:
        produce(["--config", str(config)])
    assert usage.value.code == 2


def test_deletes_are_gathered_from_arguments_list_files_and_manifests(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# to remove\ncats/a.png\n\n  dogs/c.png  \n")
    jsonl = tmp_path / "gone.jsonl"
    jsonl.write_text('{"id": "j1", "collection": "pets"}\n{"source": "x.png"}\n{oops\n')
    csv = tmp_path / "gone.csv"
    csv.write_text("id,source,collection\nc1,a.png,\nc2,,pets\n,b.png,\n")
    entries = gather_deletes(["top.png", ""], list_files=[ids], manifests=[jsonl, csv])
    built: dict[str, tuple[str, str | None]] = {}
    problems: list[str] = []
    for entry in entries:
        try:
            delete = build_delete(entry, collection="photos")
        except EntryError as exc:
            problems.append(str(exc))
        else:
            built[entry.origin] = (delete.id, delete.collection)
    assert built == {
        "'top.png'": ("top.png", "photos"),
        f"{ids}:2": ("cats/a.png", "photos"),
        f"{ids}:4": ("dogs/c.png", "photos"),  # stripped
        f"{jsonl}:1": ("j1", "pets"),  # the line's collection wins
        f"{csv}:2": ("c1", "photos"),
        f"{csv}:3": ("c2", "pets"),
    }
    assert problems == [
        "'': invalid delete: id: String should have at least 1 character",
        f"{jsonl}:2: no id on this line (a delete needs one)",
        f"{jsonl}:3: not valid JSON: unexpected character, expected a string key: line 1 "
        "column 2 (char 1)",
        f"{csv}:4: no id on this line (a delete needs one)",
    ]
    long_id = DeleteEntry("long", "é" * 200)
    with pytest.raises(EntryError, match=r"long: .*id_max_bytes"):
        build_delete(long_id, limits=EventLimits())
    with pytest.raises(EntryError, match="bad: invalid delete: collection"):
        build_delete(DeleteEntry("bad", "x"), collection="not a name!")
    no_id_column = tmp_path / "paths.csv"
    no_id_column.write_text("source\na.png\n")
    with pytest.raises(SourceError, match="'id' column"):
        gather_deletes([], manifests=[no_id_column])


def test_delete_dry_run_validates_ids_and_refuses_image_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("kafka: {bootstrap_servers: '127.0.0.1:9'}\n")  # never reached
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n")
    run = ["--config", str(config), "--delete", "--dry-run"]
    assert produce([*run, "x", "--from-file", str(ids)]) == 0
    assert "dry run, nothing published: valid=3 invalid=0" in capsys.readouterr().out
    assert produce([*run, "x", "é" * 200, "--collection", "pets"]) == 1
    out = capsys.readouterr().out
    assert "valid=1 invalid=1" in out and "id_max_bytes" in out
    for image_only in (["--inline"], ["--metadata", "k=v"], ["--include", "*.png"]):
        with pytest.raises(SystemExit) as usage:
            produce([*run, "x", *image_only])
        assert usage.value.code == 2
    assert f"--delete takes ids: {image_only[0]} do not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        produce([*run])  # no id at all
    # Kafka unreachable: one line, nothing sent, exit status 1, as when publishing.
    assert produce(["--config", str(config), "--delete", "x"]) == 1
    assert "delivered=0 not_sent=1" in capsys.readouterr().out
