"""The stage machinery: failed stages leave nothing, dead runs' leftovers are removed, keys
follow the content a stage consumes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vocabmetric.building.stages import Stages, save_array, stage_key


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    """The id of a running process that is not this one (a concurrent build)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_stage_that_raises_leaves_nothing(tmp_path):
    stages = Stages(tmp_path)

    def work(tmp):
        (tmp / "half.npy").write_bytes(b"partial")
        raise RuntimeError("the stage failed")

    with pytest.raises(RuntimeError, match="the stage failed"):
        stages.run("embed", "abc", work)
    assert list((tmp_path / "cache").iterdir()) == []
    assert stages.results == []


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, live_pid):
    dead = dead_pid()
    cache = tmp_path / "cache"
    left = [cache / f".embed-1111.tmp-{dead}", cache / f".metric-knn-2222.tmp-{dead}",
            tmp_path / f".metric.zarr.tmp-{dead}", tmp_path / f".metric.zarr.old-{dead}"]
    kept = [cache / f".embed-1111.tmp-{live_pid}", tmp_path / f".metric.zarr.tmp-{live_pid}",
            cache / "embed-1111", tmp_path / "metric.zarr", tmp_path / ".hidden-user-dir"]
    for d in left + kept:
        d.mkdir(parents=True)
        (d / "x").write_text("x")
    Stages(tmp_path).remove_leftovers()
    assert [d for d in left if d.exists()] == []
    assert [d for d in kept if not d.exists()] == []


def _random_stage(stages: Stages, seed: int):
    def work(tmp):
        save_array(tmp / "vectors.npy", np.random.default_rng(seed).random((5, 3), dtype=np.float32))
        (tmp / "meta.json").write_text(f'{{"seconds": {seed}}}')  # not content: a timing

    return stages.run("embed", "samekey", work, content=("vectors.npy",))


def test_the_digest_is_the_content_a_consumer_reads(tmp_path):
    first = Stages(tmp_path)
    path = _random_stage(first, 0)
    digest = first.results[-1].digest
    assert len(digest) == 64 and (path / "DONE").is_file()
    again = Stages(tmp_path)
    _random_stage(again, 99)  # cached: the work does not run, the recorded digest is read back
    assert again.results[-1].cached and again.results[-1].digest == digest
    other = Stages(tmp_path / "other")
    _random_stage(other, 0)  # same vectors, another timing: same content
    assert other.results[-1].digest == digest


def test_a_changed_upstream_output_changes_the_downstream_key(tmp_path):
    """A rerun upstream stage (same key) whose output differs — word2vec on several threads —
    must not let a downstream stage reuse what it built from the old output."""
    stages = Stages(tmp_path)
    _random_stage(stages, 0)
    before = stage_key("metric-knn", {"k": 4}, stages.results[-1].digest)
    rerun = Stages(tmp_path, force=True)
    _random_stage(rerun, 1)
    assert rerun.results[-1].key == stages.results[-1].key
    after = stage_key("metric-knn", {"k": 4}, rerun.results[-1].digest)
    assert after != before
