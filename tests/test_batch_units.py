"""The batch job's parts that need no cluster: the plan read from a config, the Parquet parts
and resume, the message when the cluster has no room, and the file patterns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from serve_app.tools.batch.job import Tally
from serve_app.tools.batch.parts import OutputDirError, PartWriter, done_paths, prepare, read_rows
from serve_app.tools.batch.plan import PlanError, plan_job
from serve_app.tools.batch.resources import connect, describe_shortage
from serve_app.tools.client import expand
from serve_app.tools.cluster import free_port
from tests.conftest import REPO

CPU_CONFIG = REPO / "configs" / "cpu.yaml"


def test_the_plan_is_the_configs_default_variant_and_router_limits():
    plan = plan_job(CPU_CONFIG)
    assert plan.variant == "large" and plan.model.precision == "fp32"
    assert plan.model.max_batch_size == 1 and plan.model.threads == 2
    assert plan.limits.max_duration_s == 120 and plan.max_upload_bytes == 10485760
    assert plan.decode_workers == 2 and plan.max_padded_samples == 120 * 16_000


def test_an_alias_a_batch_size_and_raised_limits():
    plan = plan_job(CPU_CONFIG, "fast", batch_size=8, max_duration_s=900,
                    max_upload_bytes=2**30)
    assert plan.variant == "turbo" and plan.model.precision == "reduced"
    assert plan.model.max_batch_size == 8
    assert plan.limits.max_duration_s == 900 and plan.max_upload_bytes == 2**30
    # The variant's own array limit follows the raised duration: one limit, not two.
    assert plan.model.max_audio_s >= 900


def test_plans_that_cannot_run(tmp_path):
    with pytest.raises(PlanError, match="unknown model_version 'huge'"):
        plan_job(CPU_CONFIG, "huge")
    with pytest.raises(PlanError, match="max_batch_size"):
        plan_job(CPU_CONFIG, batch_size=1000)
    config = yaml.safe_load(CPU_CONFIG.read_text())
    router = config["applications"][0]["deployments"][0]
    router["user_config"]["aliases"] = {"canary": {"large": 9, "turbo": 1}}
    weighted = tmp_path / "weighted.yaml"
    weighted.write_text(yaml.safe_dump(config))
    with pytest.raises(PlanError, match="splits requests between"):
        plan_job(weighted, "canary")
    with pytest.raises(PlanError, match="cannot read"):
        plan_job(tmp_path / "missing.yaml")


def _rows(paths: list[str], variant: str = "base") -> pa.Table:
    return pa.table({"path": paths, "status": ["ok"] * len(paths),
                     "model_version": [variant] * len(paths)})


def test_parts_are_complete_or_absent_and_resume_skips_their_paths(tmp_path):
    out = tmp_path / "out"
    assert prepare(out, False, "base", False) == set()
    writer = PartWriter(out, part_rows=3, part_s=3600)
    writer.add(_rows(["a", "b"]))
    assert not list(out.iterdir())  # under part_rows: nothing written yet
    writer.add(_rows(["c", "d", "e", "f", "g"]))
    assert len(writer.written) == 2  # 7 rows: two parts of 3, one row pending
    writer.close()
    assert [pq.read_metadata(p).num_rows for p in writer.written] == [3, 3, 1]
    assert sorted(read_rows(out).column("path").to_pylist()) == list("abcdefg")
    # A part being written when a job was killed: hidden, ignored, removed on resume.
    partial = out / ".part-killed-00000.parquet.tmp"
    partial.write_bytes(b"PAR1 half a part")
    assert done_paths(out) == set("abcdefg")
    with pytest.raises(OutputDirError, match="not empty: pass --resume"):
        prepare(out, False, "base", False)
    assert prepare(out, True, "base", False) == set("abcdefg") and not partial.exists()
    # Resuming with another model, or with embeddings, would mix two kinds of rows.
    with pytest.raises(OutputDirError, match=r"holds rows of \['base'\]; this job scores"):
        prepare(out, True, "large", False)
    with pytest.raises(OutputDirError, match="written without --embeddings"):
        prepare(out, True, "base", True)
    with pytest.raises(OutputDirError, match="written without --by-segment"):
        prepare(out, True, "base", False, by_segment=True)


def test_a_recordings_segment_rows_stay_in_one_part(tmp_path):
    writer = PartWriter(tmp_path, part_rows=2, part_s=3600)
    writer.add(_rows(["a", "b", "b", "b"]))  # b's three segments would straddle a cut at 2
    writer.add(_rows(["c", "c"]))
    writer.close()
    parts = [pq.read_table(part).column("path").to_pylist() for part in writer.written]
    assert parts == [["a", "b", "b", "b"], ["c", "c"]]


def test_the_summary_counts_files_not_segment_rows():
    table = pa.table({
        "path": ["a", "a", "b", "c", "d", "d"], "segment": [0, 1, None, None, 0, 1],
        "status": ["ok", "ok", "ok", "failed", "ok", "failed"],
        "error_code": [None, None, None, "unsupported_audio", None, "model_error"],
        "duration_s": [10.0, 10.0, 2.0, None, 5.0, 5.0], "node_id": ["n"] * 6})
    tally = Tally()
    tally.add(table)
    # b: no speech (ok, no segment); c failed to decode; d has a failed segment: d failed.
    assert tally.statuses == {"ok": 2, "failed": 2} and tally.segments == 4
    assert tally.audio_s == 12.0 and tally.errors == {"unsupported_audio": 1, "model_error": 1}


def test_a_slow_job_writes_a_part_when_its_oldest_row_is_part_s_old(tmp_path):
    writer = PartWriter(tmp_path, part_rows=1000, part_s=0.0)
    writer.add(_rows(["a"]))
    assert len(writer.written) == 1


def test_no_room_names_what_is_missing():
    bundles = [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}]
    message = describe_shortage(bundles, {"CPU": 1.35}, {"CPU": 2.0}, [{"CPU": 1.35}])
    assert "2 engine actor(s) x {CPU: 1}" in message
    assert "{CPU: 1.35} free of {CPU: 2}" in message and "missing {CPU: 1.15}" in message
    message = describe_shortage([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 0.5}],
                                {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0},
                                [{"CPU": 0.2, "GPU": 1.0}, {"CPU": 3.8}])
    assert "no node has {CPU: 1, GPU: 1} free" in message


def test_glob_patterns_and_directories(tmp_path):
    for name in ("a.wav", "b.flac", "sub/c.wav", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = lambda files: [p.relative_to(tmp_path).as_posix() for p in files]  # noqa: E731
    assert names(expand([str(tmp_path / "*.wav")])) == ["a.wav"]
    assert names(expand([str(tmp_path / "**" / "*.wav")])) == ["a.wav", "sub/c.wav"]
    assert names(expand([str(tmp_path / "s*")])) == ["sub/c.wav"]  # a directory matched
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand([str(tmp_path / "*.mp3")])


def test_an_address_where_nothing_listens_fails_at_once():
    address = f"127.0.0.1:{free_port()}"  # closed again: nothing listens there
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at {address}"):
        connect(address)
