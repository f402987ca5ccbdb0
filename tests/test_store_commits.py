"""A flush is all or nothing: a real writer process killed at each boundary of a flush, or a compaction killed
at each of its steps, leaves every step either whole in every table or absent, before and after `compact`.

The kill is `os._exit` inside the writer's own file functions (so it lands exactly on the boundary, as a
SIGKILL would there): between two tables of a flush, between two routes files of one flush, after every segment
but before the commit record, and in the middle of writing the commit record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeviz.store import StoreWarning, compact, layout, open_store, store_info

ROOT = str(Path(__file__).resolve().parents[1])
LAYERS, TOKENS, K, SEQS = 2, 64, 2, 4  # per step: 64 tokens in 4 sequences of 16, 2 layers, top-2
KILLED_FLUSH = 2  # flushes 0 and 1 are committed; the writer dies inside flush 2

WRITER = """
import os, sys, numpy as np
from moeviz.store import RunWriter, layout
boundary = sys.argv[2]
layout.ROUTES_ROWS_PER_LAYER = 40  # 128 routes per layer and step: 4 routes files per flush
state = {"flush": 0, "routes_files": 0}
real_segment, real_commit = layout.write_segment, layout.write_commit

def write_segment(run_dir, table, rank, seq, data):
    if state["flush"] == %(killed)d:
        if boundary == "between_tables" and table == "routes":
            os._exit(9)  # step_stats and layer_stats of this flush are on disk, routes are not
        if table == "routes":
            state["routes_files"] += 1
            if boundary == "between_routes_files" and state["routes_files"] == 3:
                os._exit(9)  # two of the flush's routes files are on disk
    return real_segment(run_dir, table, rank, seq, data)

def write_commit(run_dir, rank, seq, files):
    if state["flush"] == %(killed)d and boundary == "before_commit":
        os._exit(9)  # every segment of the flush is on disk, its commit is not
    if state["flush"] == %(killed)d and boundary == "inside_commit":
        folder = layout.commit_dir(run_dir, rank)
        (folder / f".commit-{seq:08d}.json.deadbeef.tmp").write_text('{"rank": 0, "files": [')
        os._exit(9)  # half a commit record, under its temporary name
    return real_commit(run_dir, rank, seq, files)

layout.write_segment, layout.write_commit = write_segment, write_commit
w = RunWriter(sys.argv[1])
w.write_run({"model_class": "Tiny", "n_layers": %(layers)d, "n_experts": 8, "top_k": %(k)d})
rng = np.random.default_rng(0)
for step in range(4):
    n = %(layers)d * %(tokens)d * %(k)d
    tok = np.arange(%(tokens)d)
    w.write_flush({
        "step_stats": {"step": step, "layer": np.repeat(np.arange(%(layers)d), 8), "expert": np.tile(np.arange(8), %(layers)d),
                       "tokens": 16, "assigned": 16, "first_choice": 8, "prob_sum": 8.0, "dropped": 0},
        "layer_stats": {"step": np.full(%(layers)d, step), "layer": np.arange(%(layers)d), "tokens": %(tokens)d,
                        "z_loss_sum": 1.0, "entropy_sum": 2.0, "dropped": 0},
        "routes": {"step": step, "seq": np.tile(np.repeat(tok // 16, %(k)d), %(layers)d),
                   "pos": np.tile(np.repeat(tok %% 16, %(k)d), %(layers)d), "token_id": rng.integers(0, 1000, n),
                   "layer": np.repeat(np.arange(%(layers)d), %(tokens)d * %(k)d), "slot": np.tile([0, 1], n // 2),
                   "expert": rng.integers(0, 8, n), "weight": rng.random(n)},
        "sequences": {"step": np.full(%(seqs)d, step), "seq": np.arange(%(seqs)d), "domain": "code", "tag": "train",
                      "n_tokens": 16},
    })
    state["flush"] += 1
w.close()
""" % {"killed": KILLED_FLUSH, "layers": LAYERS, "tokens": TOKENS, "k": K, "seqs": SEQS}

# rows one whole step holds in each table
WHOLE = {"routes": LAYERS * TOKENS * K, "step_stats": LAYERS * 8, "layer_stats": LAYERS, "sequences": SEQS}


def rows_per_step(run_dir: Path) -> dict[str, dict[int, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        con = open_store(run_dir)
    try:
        return {t: dict(con.execute(f"SELECT step, count(*) FROM {t} GROUP BY step").fetchall()) for t in WHOLE}
    finally:
        con.close()


def assert_every_step_whole_or_absent(run_dir: Path, steps: list[int]) -> None:
    counts = rows_per_step(run_dir)
    for t, per_step in counts.items():
        assert per_step == {s: WHOLE[t] for s in steps}, (t, per_step)


def kill_writer(run_dir: Path, boundary: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", WRITER, str(run_dir), boundary], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 9, p.stderr


@pytest.mark.parametrize("boundary", ["between_tables", "between_routes_files", "before_commit", "inside_commit"])
def test_a_writer_killed_inside_a_flush_leaves_only_whole_steps(tmp_path, boundary):
    run_dir = tmp_path / "run"
    kill_writer(run_dir, boundary)
    on_disk = len(list(run_dir.glob("routes/rank=0/part-*.parquet")))
    written_of_killed = {"between_tables": 0, "between_routes_files": 2, "before_commit": 4, "inside_commit": 4}
    assert on_disk == 2 * 4 + written_of_killed[boundary]  # two committed flushes of 4 routes files each
    assert_every_step_whole_or_absent(run_dir, [0, 1])
    info = store_info(run_dir)["runs"][0]
    uncommitted = {"between_tables": 2, "between_routes_files": 4, "before_commit": 7, "inside_commit": 7}
    assert len(info["uncommitted_files"]) == uncommitted[boundary]  # step_stats, layer_stats, routes, sequences
    assert info["routes"] == 2 * WHOLE["routes"]

    result = compact(run_dir)["runs"][0]
    expected_leftovers = uncommitted[boundary] + (boundary == "inside_commit")  # + the half commit record
    assert result["leftovers_removed"] == expected_leftovers
    assert not list(run_dir.glob("*/rank=0/*.parquet")) and not list(run_dir.glob("_commits/rank=0/*"))
    assert_every_step_whole_or_absent(run_dir, [0, 1])
    assert compact(run_dir)["runs"][0]["leftovers_removed"] == 0


def test_the_commit_records_name_every_file_another_engine_needs(tmp_path):
    """Another engine reads the committed file list (plain JSON) and gets exactly what moeviz reads."""
    run_dir = tmp_path / "run"
    kill_writer(run_dir, "before_commit")
    named = []
    for f in sorted(run_dir.glob("_commits/rank=*/commit-*.json")):
        named += [e["path"] for e in json.loads(f.read_text())["files"] if e["table"] == "routes"]
    n = pa.concat_tables([pq.read_table(run_dir / p) for p in named]).num_rows
    assert n == 2 * WHOLE["routes"] == sum(rows_per_step(run_dir)["routes"].values())


COMPACTOR = """
import os, sys
from moeviz.store import compaction
where = sys.argv[2]
real_publish, real_unlink_commit = compaction._publish_compacted, compaction._remove_leftovers

def publish(*args, **kwargs):
    if where == "before_publish":
        os._exit(9)  # the compacted routes files are written, run.duckdb is not replaced
    out = real_publish(*args, **kwargs)
    if where == "after_publish":
        os._exit(9)  # run.duckdb names the folded segments; no commit record or segment deleted yet
    return out

compaction._publish_compacted = publish
compaction.compact(sys.argv[1])
"""


@pytest.mark.parametrize("where", ["before_publish", "after_publish"])
def test_a_compaction_killed_midway_leaves_only_whole_steps(tmp_path, where):
    run_dir = tmp_path / "run"
    kill_writer(run_dir, "between_routes_files")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", COMPACTOR, str(run_dir), where], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 9, p.stderr
    assert_every_step_whole_or_absent(run_dir, [0, 1])
    compact(run_dir)
    assert_every_step_whole_or_absent(run_dir, [0, 1])
    assert not list(run_dir.glob("*/rank=0/*.parquet"))


# --- damage costs only itself ------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moeviz.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def two_runs(tmp_path: Path) -> Path:
    """A folder with two recorded runs (steps 0-1 committed in each; the writers died in flush 2)."""
    for name in ("a", "b"):
        kill_writer(tmp_path / "runs" / name, "between_tables")
    return tmp_path / "runs"


def scramble(path: Path) -> None:
    """Keep the Parquet magic at both ends and the footer length; replace everything between with noise."""
    data = bytearray(path.read_bytes())
    data[4:-8] = os.urandom(len(data) - 12)
    path.write_bytes(bytes(data))


def test_a_scrambled_segment_costs_only_itself(tmp_path):
    runs = two_runs(tmp_path)
    (victim,) = [p for p in sorted((runs / "a" / "routes" / "rank=0").glob("*.parquet"))][:1]
    lost = pq.read_metadata(victim).num_rows
    scramble(victim)
    with pytest.warns(StoreWarning, match=rf"skipped 1 damaged Parquet file.*{victim.name} \(its Parquet footer"):
        con = open_store(runs)
    got = dict(con.execute("SELECT run_id, count(*) FROM routes GROUP BY ALL").fetchall())
    assert got == {"a": 2 * WHOLE["routes"] - lost, "b": 2 * WHOLE["routes"]}  # the rest of a, all of b
    assert con.execute("SELECT count(*) FROM step_stats").fetchone()[0] == 2 * 2 * WHOLE["step_stats"]
    con.close()
    p = cli("check", str(runs))
    assert p.returncode == 1 and "store" in p.stdout and victim.name in p.stdout and "Traceback" not in p.stderr
    p = cli("info", str(runs / "a"))
    assert p.returncode == 0 and "skipped 1 damaged Parquet file" in p.stdout, p.stderr
    result = {r["run_id"]: r for r in compact(runs)["runs"]}
    assert result["a"]["skipped_files"] == [str(victim)] and result["b"]["skipped_files"] == []
    assert sum(rows_per_step(runs / "a")["routes"].values()) == 2 * WHOLE["routes"] - lost


def test_a_foreign_file_in_a_store_without_commits_is_skipped(tmp_path):
    """A store of schema version 1 (no commit records) still globs its folders: a Parquet file of another table
    dropped there is named in a warning and left out, instead of being read as rows."""
    run_dir = tmp_path / "run"
    kill_writer(run_dir, "before_commit")
    compact(run_dir)  # a clean start, then a version 1 run: segments and no commits
    kill_writer(tmp_path / "donor", "between_tables")
    manifest = json.loads((run_dir / "moeviz.json").read_text())
    manifest.update(schema_version=1)
    manifest.pop("commits")
    (run_dir / "moeviz.json").write_text(json.dumps(manifest))
    foreign = run_dir / "step_stats" / "rank=0" / "part-00000099-0f0f0f0f.parquet"
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(next((tmp_path / "donor" / "routes" / "rank=0").glob("*.parquet")).read_bytes())
    with pytest.warns(StoreWarning, match=r"part-00000099-0f0f0f0f.parquet \(its columns are not those of step_stats"):
        con = open_store(run_dir)
    assert con.execute("SELECT count(*), max(expert) FROM step_stats").fetchone() == (2 * WHOLE["step_stats"], 7)
    assert con.execute("SELECT schema_version FROM runs").fetchone()[0] == 1


def test_a_garbage_run_duckdb_is_reported_everywhere_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    kill_writer(run_dir, "between_tables")
    compact(run_dir)
    (run_dir / "run.duckdb").write_bytes(b"this is not a database" * 100)
    with pytest.warns(StoreWarning, match=r"run.duckdb cannot be opened .*the data compacted into it is missing"):
        con = open_store(run_dir)
    status, error = con.execute("SELECT status, error FROM runs").fetchone()
    assert status == "damaged" and "mv " in error
    assert con.execute("SELECT count(*) FROM routes").fetchone()[0] == 0
    for args, code in ((("info", str(run_dir)), 0), (("check", str(run_dir)), 1), (("compact", str(run_dir)), 2),
                       (("sql", str(run_dir), "SELECT status FROM runs"), 0)):
        p = cli(*args)
        assert p.returncode == code and "Traceback" not in p.stderr, (args, p.stderr)
        assert "damaged" in p.stdout + p.stderr or "cannot be opened" in p.stdout + p.stderr, (args, p.stdout)


# --- other engines -----------------------------------------------------------------------------------------------


def committed_routes(run_dir: Path) -> pa.Table:
    """The routes a run's commit records name, read with pyarrow alone (no moeviz reader)."""
    named = []
    for f in sorted(run_dir.glob("_commits/rank=*/commit-*.json")):
        named += [e["path"] for e in json.loads(f.read_text())["files"] if e["table"] == "routes"]
    return pa.concat_tables([pq.read_table(run_dir / p) for p in named])


def test_export_is_read_alike_by_pyarrow_pandas_and_polars(tmp_path):
    """A folder with a compacted run and a live one (with a torn flush on disk): the export holds the committed
    rows of both, once, and three engines read the same rows from one path per table."""
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    runs = tmp_path / "runs"
    kill_writer(runs / "done", "between_routes_files")
    expected_done = committed_routes(runs / "done")
    compact(runs / "done")
    kill_writer(runs / "torn", "before_commit")
    expected = pa.concat_tables([expected_done, committed_routes(runs / "torn")])
    out = tmp_path / "export"
    p = cli("export", str(runs), str(out))
    assert p.returncode == 0, p.stderr

    key = ["run_id", "step", "layer", "seq", "pos", "slot"]
    want = expected.to_pandas()
    want["run_id"] = ["done"] * expected_done.num_rows + ["torn"] * (len(want) - expected_done.num_rows)
    want["weight"] = want.pop("weight_q") / 65535
    want = want.sort_values(key).reset_index(drop=True)
    frames = {
        "pyarrow": ds.dataset(out / "routes").to_table().to_pandas(),
        "pandas": pd.read_parquet(out / "routes"),
        "polars": pl.scan_parquet(str(out / "routes" / "*.parquet")).collect().to_pandas(),
    }
    for engine, got in frames.items():
        got = got.sort_values(key).reset_index(drop=True)
        assert len(got) == len(want) == 4 * WHOLE["routes"], engine
        for c in ("step", "layer", "seq", "pos", "slot", "expert", "token_id"):
            assert (got[c].to_numpy() == want[c].to_numpy()).all(), (engine, c)
        assert (got["run_id"].astype(str).to_numpy() == want["run_id"].to_numpy()).all(), engine
        assert abs(got["weight"].to_numpy() - want["weight"].to_numpy()).max() < 1e-9, engine
    steps = pd.read_parquet(out / "step_stats").groupby(["run_id", "step"]).size().to_dict()
    assert steps == {(r, s): WHOLE["step_stats"] for r in ("done", "torn") for s in (0, 1)}
    assert sorted(pl.read_parquet(out / "runs" / "*.parquet")["run_id"].to_list()) == ["done", "torn"]


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
    kill_writer(tmp_path / "run", "between_tables")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    p = cli("export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert p.returncode == 2 and "not empty" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


RECORDING = """
import os, sys, torch
from collectors import Recorder
from collectors.testing import tiny_linear_gate_moe
from moeviz.store import layout

boundary, state = sys.argv[2], {"routes_files": 0}
layout.ROUTES_ROWS_PER_LAYER = 4  # 2 x 5 tokens x top-2 = 20 routes per layer and step: 5 files per flush
real_segment = layout.write_segment

def write_segment(run_dir, table, rank, seq, data):  # runs in the Recorder's writer thread
    if table == "routes" and data.column("step")[0].as_py() == 3:
        state["routes_files"] += 1
        if boundary == "between_tables" or state["routes_files"] == 3:
            os._exit(9)
    return real_segment(run_dir, table, rank, seq, data)

layout.write_segment = write_segment
torch.set_num_threads(1)
model, _ = tiny_linear_gate_moe()
gen = torch.Generator().manual_seed(0)
rec = Recorder(model, sys.argv[1], run_name="doomed", flush_every=1).start()
for step in range(6):
    model(torch.randint(0, 64, (2, 5), generator=gen))
    rec.step(step)
    rec.flush()  # the flush of this step is written before the next step starts
rec.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("boundary", ["between_tables", "between_routes_files"])
def test_a_recording_training_process_killed_inside_a_flush_leaves_only_whole_steps(tmp_path, boundary):
    """The same with a real model recorded by the Recorder: its writer thread dies inside the flush of step 3."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", RECORDING, str(run_dir), boundary], env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 9, p.stderr
    for when in ("before compact", "after compact"):
        counts = rows_per_step(run_dir)
        steps = {t: sorted(c) for t, c in counts.items() if t != "sequences"}
        assert steps == {"routes": [0, 1, 2], "step_stats": [0, 1, 2], "layer_stats": [0, 1, 2]}, (when, steps)
        assert set(counts["routes"].values()) == {2 * 5 * 2 * 2}, when  # 2 layers x 10 tokens x top-2, every step
        if when == "before compact":
            assert compact(run_dir)["runs"][0]["leftovers_removed"] > 0


def test_a_read_only_file_system_is_said_in_one_line(tmp_path, monkeypatch):
    """Root ignores permission bits, so the refusal is injected where the file system would give it."""
    import errno

    from moeviz.errors import StoreError
    from moeviz.store import RunWriter, compaction, writer

    kill_writer(tmp_path / "run", "between_tables")
    real_open = os.open

    def read_only_open(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(compaction.os, "open", read_only_open)
    with pytest.raises(StoreError, match=r"cannot compact .*Read-only file system.*still reads as it is"):
        compact(tmp_path / "run")
    monkeypatch.undo()
    assert_every_step_whole_or_absent(tmp_path / "run", [0, 1])

    def read_only_touch(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(writer.Path, "touch", read_only_touch)
    with pytest.raises(StoreError, match=r"cannot write into .*Read-only file system"):
        RunWriter(tmp_path / "new")


def test_an_unreadable_commit_record_leaves_out_its_whole_flush(tmp_path):
    run_dir = tmp_path / "run"
    kill_writer(run_dir, "between_tables")
    records = sorted(run_dir.glob("_commits/rank=0/commit-*.json"))  # the runs row, then flushes 0 and 1
    records[-1].write_text('{"rank": 0, "files": [')  # damaged after the fact (a bad disk, a bad copy)
    with pytest.warns(StoreWarning, match=r"commit-00000002.json \(a commit record that cannot be read"):
        open_store(run_dir).close()
    assert_every_step_whole_or_absent(run_dir, [0])


def test_recording_errors_of_every_rank_reach_the_runs_row(tmp_path):
    """A runs row is written per rank and the reader shows the lowest rank's; what each rank lost while recording
    is in its status file, and `runs` sums it."""
    from moeviz.store import RunWriter

    writers = [RunWriter(tmp_path / "r", run_id="r", rank=r, world_size=2, compact_on_close=False) for r in (0, 1)]
    for w in writers:
        w.write_run({"model_class": "Tiny", "n_layers": 1, "n_experts": 4, "top_k": 1})
    writers[1].record_error("the flush of steps 4-9 was lost (No space left on device)")
    writers[1].record_error("the flush of steps 10-19 was lost (No space left on device)")
    for w in writers:
        w.close()
    for when in ("segments", "compacted"):
        con = open_store(tmp_path / "r")
        assert con.execute("SELECT recording_errors, recording_error FROM runs").fetchone() == (
            2, "the flush of steps 4-9 was lost (No space left on device)"), when
        con.close()
        assert store_info(tmp_path / "r")["runs"][0]["recording_errors"] == 2, when
        compact(tmp_path / "r")
    assert "the recording lost data 2 time(s)" in cli("info", str(tmp_path / "r")).stdout
