"""The adapter folder's owner: name rule, record, verify and atomic publish (no torch, no model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loracore import artifact
from loracore.artifact import CONFIG_FILE, RECORD_FILE, STAGING, WEIGHTS_FILE, ArtifactError, Record
from loracore.template import DEFAULT_TEMPLATE

WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      not real safetensors, only bytes to hash"


def write_folder(folder: Path, *, record: Record | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / WEIGHTS_FILE).write_bytes(WEIGHTS)
    artifact.write_record(folder, record or Record(template=DEFAULT_TEMPLATE.to_dict(), base_model="b"))
    return folder


@pytest.mark.parametrize("name", ["a", "alpha", "A-1_b.c", "x" * 64, "0start"])
def test_good_names_are_accepted(name: str) -> None:
    assert artifact.name_problem(name) is None and artifact.valid_name(name)


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".staging", "a..b", "../x", "a/b", "x\n", "-x", "_x", "a b", "x" * 65, None, 3]
)
def test_bad_names_are_refused_with_a_reason(name: object) -> None:
    problem = artifact.name_problem(name)
    assert problem and problem.startswith("invalid adapter name") and not artifact.valid_name(name)
    assert not artifact.valid_name(STAGING)


def test_record_round_trips_and_keeps_the_file_layout(tmp_path: Path) -> None:
    record = Record(
        template=DEFAULT_TEMPLATE.to_dict(),
        base_model="distilgpt2",
        sha256="ab" * 32,
        created="2026-01-02T03:04:05Z",
    )
    record.job = "job-0123456789abcdef0123"
    record.base = {"model_type": "gpt2", "hidden_size": 768, "num_layers": 6, "name": "distilgpt2"}
    artifact.write_record(tmp_path, record)
    assert artifact.read_record(tmp_path) == record
    on_disk = json.loads((tmp_path / RECORD_FILE).read_text())
    assert list(on_disk) == ["template", "base_model", "sha256", "created", "job", "base", "format"]
    assert on_disk["format"] == artifact.RECORD_FORMAT == 1


def test_read_record_tolerates_absent_partial_and_broken_records(tmp_path: Path) -> None:
    assert artifact.read_record(tmp_path) is None
    (tmp_path / RECORD_FILE).write_text("[1, 2]")
    assert artifact.read_record(tmp_path) is None
    (tmp_path / RECORD_FILE).write_text("{not json")
    assert artifact.read_record(tmp_path) is None
    (tmp_path / RECORD_FILE).write_text(json.dumps({"template": "not an object", "extra": 1}))
    assert artifact.read_record(tmp_path) == Record()


def test_file_sha256_streams_and_concatenates(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * (3 << 20))
    b.write_bytes(b"tail")
    assert artifact.file_sha256(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert artifact.file_sha256(a, None, b) == hashlib.sha256(a.read_bytes() + b"tail").hexdigest()


def test_verify_accepts_a_good_folder_and_fills_in_the_hash(tmp_path: Path) -> None:
    record = artifact.verify(write_folder(tmp_path / "good"))
    assert record.sha256 == hashlib.sha256(WEIGHTS).hexdigest() and record.base_model == "b"


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE])
def test_verify_catches_a_missing_file(tmp_path: Path, missing: str) -> None:
    folder = write_folder(tmp_path / "f")
    (folder / missing).unlink()
    with pytest.raises(ArtifactError, match=missing.replace(".", r"\.")):
        artifact.verify(folder)


def test_verify_catches_corrupt_files(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "f", record=Record(template={}, sha256=hashlib.sha256(WEIGHTS).hexdigest())
    )
    artifact.verify(folder)
    (folder / WEIGHTS_FILE).write_bytes(WEIGHTS + b"flipped")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        artifact.verify(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifact.verify(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ArtifactError, match="not describe a LoRA"):
        artifact.verify(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    artifact.write_record(folder, Record(base_model="b"))
    with pytest.raises(ArtifactError, match="no prompt template"):
        artifact.verify(folder)


def test_publish_seals_the_record_and_renames_in(tmp_path: Path) -> None:
    final = tmp_path / "adapters" / "alpha"
    with artifact.staged(final) as folder:
        assert folder.parent == tmp_path / "adapters" / STAGING
        write_folder(folder)
        record = artifact.publish(folder, final)
    assert artifact.is_complete(final) and not folder.exists()
    assert artifact.read_record(final) == record and record.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert list((tmp_path / "adapters" / STAGING).iterdir()) == []


def test_a_staged_folder_stages_beside_itself(tmp_path: Path) -> None:
    output = tmp_path / "adapters" / STAGING / "job-0123456789abcdef0123"  # a /train job's --output
    with artifact.staged(output) as folder:
        assert folder.parent == output.parent  # one staging level, not .staging/.staging
        write_folder(folder)
        artifact.publish(folder, output)
    assert artifact.is_complete(output)


def test_a_failed_publish_leaves_no_half_folder(tmp_path: Path) -> None:
    final = tmp_path / "adapters" / "alpha"
    write_folder(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with pytest.raises(ArtifactError), artifact.staged(final) as folder:
        write_folder(folder)
        (folder / WEIGHTS_FILE).unlink()  # e.g. the writer died half-way
        artifact.publish(folder, final)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # the old version is untouched
    assert list((tmp_path / "adapters" / STAGING).iterdir()) == []  # and nothing half-written stays
    with pytest.raises(RuntimeError), artifact.staged(tmp_path / "adapters" / "new") as folder:
        write_folder(folder)
        raise RuntimeError("interrupted before publishing")
    assert not (tmp_path / "adapters" / "new").exists()
    assert list((tmp_path / "adapters" / STAGING).iterdir()) == []


# --- versions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["a@0123abcd", "a@" + "f" * 64, "A-1@DEADBEEF", "x"])
def test_good_refs_are_accepted(ref: str) -> None:
    assert artifact.ref_problem(ref) is None
    name, version = artifact.split_ref(ref)
    assert artifact.valid_name(name) and (version is None or version == version.lower())


@pytest.mark.parametrize("ref", ["a@", "a@0123abc", "a@0123abcg", "a@" + "f" * 65, "a@1@2", "@01234567"])
def test_bad_refs_are_refused_with_a_reason(ref: str) -> None:
    problem = artifact.ref_problem(ref)
    assert problem and problem.startswith("invalid adapter")


def _publish_version(adapter_dir: Path, name: str, weights: bytes, keep: int) -> str:
    with artifact.staged(adapter_dir / name) as staging:
        write_folder(staging)
        (staging / WEIGHTS_FILE).write_bytes(weights)
        if (adapter_dir / name).exists():
            artifact.keep_version(adapter_dir, name, keep, replacing=True)
        return artifact.publish(staging, adapter_dir / name).sha256


def test_publishing_keeps_earlier_versions_up_to_the_limit(tmp_path: Path) -> None:
    ids = [_publish_version(tmp_path, "a", WEIGHTS + bytes([i]), keep=2) for i in range(4)]
    found = artifact.versions(tmp_path, "a")
    assert [v.id for v in found] == ids[::-1][:3] and [v.current for v in found] == [True, False, False]
    assert artifact.resolve(tmp_path, "a") == found[0]
    assert artifact.resolve(tmp_path, f"a@{ids[1][:8]}").folder == tmp_path / ".versions" / "a" / ids[1]
    assert artifact.file_sha256(artifact.resolve(tmp_path, f"a@{ids[2]}").folder / WEIGHTS_FILE) == ids[2]
    assert artifact.resolve(tmp_path, f"a@{ids[0][:8]}") is None  # expired
    assert sorted(p.name for p in (tmp_path / STAGING).iterdir()) == []  # no copies or trash left
    artifact.remove_versions(tmp_path, "a")
    assert not (tmp_path / ".versions" / "a").exists()


def test_a_job_publish_with_overwrite_keeps_the_replaced_version(tmp_path: Path) -> None:
    from service.jobs.publish import publish_adapter

    old = _publish_version(tmp_path, "a", WEIGHTS, keep=3)
    staged = write_folder(tmp_path / STAGING / "job-1")
    (staged / WEIGHTS_FILE).write_bytes(WEIGHTS + b"v2")
    new = publish_adapter(staged, tmp_path / "a", "job-1", overwrite=True, keep=3)
    assert [v.id for v in artifact.versions(tmp_path, "a")] == [new, old]
    assert artifact.read_record(artifact.resolve(tmp_path, f"a@{old[:8]}").folder).sha256 == old


def test_digest_follows_an_in_place_rewrite_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    import os

    folder = write_folder(tmp_path / "a")
    first = artifact.weights_digest(folder)
    before = os.stat(folder / WEIGHTS_FILE)
    with open(folder / WEIGHTS_FILE, "r+b") as fh:
        fh.write(WEIGHTS.upper())
    os.utime(folder / WEIGHTS_FILE, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert artifact.weights_digest(folder) == hashlib.sha256(WEIGHTS.upper()).hexdigest() != first
