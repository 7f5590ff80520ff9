"""The pipeline: config validation up front, cached stages, --force, resume after SIGKILL, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import LEE, lee_texts, train_bpe
from vocabmetric.errors import ConfigError, StoreError
from vocabmetric.building.pipeline import build, load_config

CONFIG = """
[tokenizer]
spec = "hf:tokenizer.json"

[corpus]
sources = ["{lee}"]
workers = 1

[embeddings]
dim = 16
epochs = 3
min_count = 2
workers = 1          # word2vec with several threads is not bit-reproducible
seed = 1

[metrics.knn]
k = 6

[metrics.geodesic]
k_graph = 4
k = 8
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A directory with a trained tokenizer and a small, fast, reproducible config."""
    root = tmp_path_factory.mktemp("pipeline")
    train_bpe(root / "tokenizer.json", vocab_size=500, texts=lee_texts()[:150])
    (root / "tiny.toml").write_text(CONFIG.format(lee=LEE.as_posix()))
    return root


@pytest.fixture(scope="module")
def built(project):
    """An uninterrupted build (the reference the other builds are compared with)."""
    return build(project / "tiny.toml", project / "reference", progress=False)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vocabmetric.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kw)


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    arrays = {name: node[...] for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert "embeddings" in arrays and "metrics/knn/indices" in arrays
    return arrays


# -- config validation --------------------------------------------------------------------
BAD_CONFIGS = {
    "unknown key": ('[corpus]\nsources = ["{lee}"]\nsorces = ["x"]', r"corpus\.sorces: unknown key"),
    "wrong type": ('[corpus]\nsources = ["{lee}"]\n[embeddings]\ndim = "128"', r"embeddings\.dim: .*'128'"),
    "bad value": ('[corpus]\nsources = ["{lee}"]\n[embeddings]\nuntrained = "random"', r"embeddings\.untrained"),
    "missing corpus file": ('[corpus]\nsources = ["no-such-corpus.txt"]', r"corpus\.sources: .*no-such-corpus\.txt"),
    "unknown metric kind": ('[corpus]\nsources = ["{lee}"]\n[metrics.cosine]\nk = 4', r"metrics\.cosine: unknown metric kind 'cosine'"),
    "unknown metric key": ('[corpus]\nsources = ["{lee}"]\n[metrics.knn]\nkk = 4', r"metrics\.knn\.kk: unknown key"),
    "wrong metric type": ('[corpus]\nsources = ["{lee}"]\n[metrics.knn]\nk = "four"', r"metrics\.knn\.k: expected int"),
    "missing section": ('[corpus]\nsources = ["{lee}"]', None),
    "missing tokenizer file": ('[corpus]\nsources = ["{lee}"]', r"tokenizer\.spec: file .*absent\.json does not exist"),
    "import without path": ('[corpus]\nsources = ["{lee}"]\n[embeddings]\nmethod = "import"', r"embeddings\.path is required"),
    "not toml": ('[corpus\nsources = 1', r"not valid TOML"),
    "bad umap argument": ('[corpus]\nsources = ["{lee}"]\n[metrics.umap]\nn_components = -1',
                          r"\[metrics\.umap\] n_components must be an integer >= 1, got -1"),
    "bad geodesic argument": ('[corpus]\nsources = ["{lee}"]\n[metrics.geodesic]\nk_graph = 0',
                              r"\[metrics\.geodesic\] k_graph must be an integer >= 1, got 0"),
    "bad knn index": ('[corpus]\nsources = ["{lee}"]\n[metrics.knn]\nindex = "ivf"',
                      r"\[metrics\.knn\] index must be 'flat' or 'hnsw', got 'ivf'"),
    "bad tree argument": ('[corpus]\nsources = ["{lee}"]\n[metrics.tree]\nbuilder = "ward"\nn_neighbors = 0',
                          r"\[metrics\.tree\] n_neighbors must be an integer >= 1, got 0"),
    "bad cap": ('[corpus]\nsources = ["{lee}"]\n[metrics.tree]\ncap = -1.0', r"\[metrics\.tree\] cap=-1\.0 must be finite and > 0"),
    "deterministic with threads": ('[corpus]\nsources = ["{lee}"]\n[embeddings]\ndeterministic = true\nworkers = 4',
                                   r"embeddings\.deterministic = true trains on one thread"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_one_clear_error_before_any_work(project, tmp_path, case):
    body, match = BAD_CONFIGS[case]
    spec = "hf:absent.json" if case == "missing tokenizer file" else f"hf:{project / 'tokenizer.json'}"
    header = "" if case == "missing section" else f'[tokenizer]\nspec = "{spec}"\n'
    config = tmp_path / "bad.toml"
    config.write_text(header + body.format(lee=LEE.as_posix()) + "\n")
    match = match or r"tokenizer: required key is missing"
    with pytest.raises(ConfigError, match=match) as info:
        build(config, tmp_path / "out", progress=False)
    assert "bad.toml" in str(info.value)
    assert not (tmp_path / "out").exists(), "work started before the config was validated"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.toml does not exist"):
        load_config(tmp_path / "nowhere.toml")


def test_cli_reports_a_config_error_without_a_traceback(project, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(f'[tokenizer]\nspec = "tiktoken:cl100k_base"\n[corpus]\nsources = ["{LEE.as_posix()}"]\nwindow = 3\n')
    result = _cli("build", config, "--out", tmp_path / "out", "-q")
    assert result.returncode == 2
    assert "corpus.window: unknown key" in result.stderr and "bad.toml" in result.stderr
    assert "Traceback" not in result.stderr


# -- cached, forced and resumed builds ----------------------------------------------------
def test_build_runs_every_stage_and_the_store_opens(built):
    from vocabmetric import open_store

    assert [r.name for r in built.stages] == ["tokenize", "embed", "knn-graph", "metric-knn", "metric-geodesic", "projection2d", "store"]
    assert not any(r.cached for r in built.stages)
    store = open_store(built.store_path)
    assert store.vocab_size == built.stats["vocab_size"] == 500
    assert store.metrics == ["l2", "geodesic", "knn"]
    assert int(store.counts.sum()) == built.stats["n_tokens"] > 50_000
    assert store.trained.sum() == built.stats["n_trained"] > 0


def test_second_build_with_nothing_changed_does_no_work(project, built):
    before = {p: p.stat().st_mtime_ns for p in built.store_path.rglob("*")}
    again = build(project / "tiny.toml", project / "reference", progress=False)
    assert [r.cached for r in again.stages] == [True] * len(built.stages)
    assert [r.key for r in again.stages] == [r.key for r in built.stages]
    assert {p: p.stat().st_mtime_ns for p in again.store_path.rglob("*")} == before


def test_changing_one_metric_rebuilds_only_that_metric(project, built, tmp_path):
    import shutil

    shutil.copytree(project / "reference", tmp_path / "out")
    config = tmp_path / "changed.toml"
    config.write_text((project / "tiny.toml").read_text().replace("k = 6", "k = 5").replace('"hf:tokenizer.json"', f'"hf:{project / "tokenizer.json"}"'))
    result = build(config, tmp_path / "out", progress=False)
    ran = {r.name for r in result.stages if not r.cached}
    assert ran == {"metric-knn", "store"}
    from vocabmetric import open_store

    assert open_store(result.store_path).operator("knn").indices.shape[1] == 5


def test_force_rebuilds_every_stage_to_the_same_store(project, built, tmp_path):
    import shutil

    shutil.copytree(project / "reference", tmp_path / "out")
    forced = build(project / "tiny.toml", tmp_path / "out", force=True, progress=False)
    assert not any(r.cached for r in forced.stages)
    reference, rebuilt = _store_arrays(built.store_path), _store_arrays(forced.store_path)
    assert reference.keys() == rebuilt.keys()
    for name in reference:
        assert np.array_equal(reference[name], rebuilt[name], equal_nan=reference[name].dtype.kind == "f"), name  # projection2d: NaN rows


def test_killed_build_resumes_to_the_same_store(project, built, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vocabmetric.cli", "build", str(project / "tiny.toml"), "--out", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = out / "cache"
    deadline = time.monotonic() + 90
    try:
        # kill in the middle of the embed stage: once its temporary directory exists (the
        # stage then imports gensim and trains, which takes far longer than this poll)
        while not list(cache.glob(".embed-*.tmp-*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the build never finished tokenizing"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(cache.glob(".embed-*.tmp-*")), "the kill did not land in the embed stage"
    assert not list(cache.glob("embed-*")) and not (out / "metric.zarr").exists()

    resumed = build(project / "tiny.toml", out, progress=False)
    assert [(r.name, r.cached) for r in resumed.stages][:2] == [("tokenize", True), ("embed", False)]
    assert not list(cache.glob(".*.tmp-*")), "the killed run's temporary directory was left behind"
    reference, result = _store_arrays(built.store_path), _store_arrays(resumed.store_path)
    assert reference.keys() == result.keys()
    for name in reference:
        assert np.array_equal(reference[name], result[name], equal_nan=reference[name].dtype.kind == "f"), name


def test_unfinished_store_does_not_open(built, tmp_path):
    import shutil

    import zarr

    from vocabmetric import open_store

    copy = tmp_path / "metric.zarr"
    shutil.copytree(built.store_path, copy)
    group = zarr.open_group(str(copy), mode="r+")
    del group.attrs["complete"]
    with pytest.raises(StoreError, match="unfinished"):
        open_store(copy)
    result = _cli("info", copy)
    assert result.returncode == 2 and "unfinished" in result.stderr
    with pytest.raises(StoreError, match="not a vocabmetric store"):
        open_store(tmp_path)


def test_cli_info_opens_the_built_store(built):
    table = _cli("info", built.store_path)
    assert table.returncode == 0, table.stderr
    assert "500" in table.stdout and "knn" in table.stdout and "geodesic" in table.stdout
    as_json = _cli("info", built.store_path, "--json")
    info = json.loads(as_json.stdout)
    assert info["tokenizer"]["vocab_size"] == 500
    assert info["tokenizer"]["spec"].endswith("tokenizer.json")
    assert info["corpus"]["n_tokens"] == built.stats["n_tokens"]
    assert info["embeddings"]["n_trained"] == built.stats["n_trained"]
    assert set(info["metrics"]) == {"l2", "knn", "geodesic"}
    assert info["metrics"]["knn"]["k"] == 6


# -- leftovers, content keys, deterministic builds ------------------------------------------
def test_leftovers_of_a_dead_build_are_removed_by_the_next_one(project, built, tmp_path):
    """A SIGKILL during the store write leaves ``OUT/.metric.zarr.tmp-<pid>``, one during a
    stage ``cache/.<stage>-<key>.tmp-<pid>``: the next build removes them, whichever stages
    it runs; those of a live process (a concurrent build) stay."""
    import shutil

    from test_stages import dead_pid

    out = tmp_path / "out"
    shutil.copytree(project / "reference", out)
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = [out / f".metric.zarr.tmp-{dead}", out / "cache" / f".embed-0123456789abcdef.tmp-{dead}"]
        kept = out / "cache" / f".embed-0123456789abcdef.tmp-{live.pid}"
        for d in [*left, kept]:
            d.mkdir()
            (d / "zarr.json").write_text("{}")
        result = build(project / "tiny.toml", out, progress=False)
        assert all(r.cached for r in result.stages)
        assert [d for d in left if d.exists()] == [] and kept.is_dir()
    finally:
        live.kill()
        live.wait()


def test_a_rerun_embed_stage_with_other_vectors_rebuilds_what_reads_them(project, built, tmp_path, monkeypatch):
    """Same config, other embeddings (word2vec on several threads differs run to run): the
    metric stages get new keys instead of reusing entries built from the old vectors."""
    import shutil

    import vocabmetric.building.pipeline as pipeline

    train = pipeline.train_word2vec

    def noisy(*args, **kw):
        emb = train(*args, **kw)
        emb.vectors[emb.trained] += np.float32(1e-3)
        return emb

    out = tmp_path / "out"
    shutil.copytree(project / "reference", out)
    shutil.rmtree(next((out / "cache").glob("embed-*")))
    monkeypatch.setattr(pipeline, "train_word2vec", noisy)
    result = build(project / "tiny.toml", out, progress=False)
    keys = {r.name: r.key for r in built.stages}
    ran = {r.name: (r.key, r.cached) for r in result.stages}
    assert ran["tokenize"] == (keys["tokenize"], True) and ran["embed"] == (keys["embed"], False)
    for name in ("knn-graph", "metric-knn", "metric-geodesic", "projection2d", "store"):
        assert ran[name][0] != keys[name] and not ran[name][1], name


def test_deterministic_builds_are_byte_identical(project, tmp_path):
    """``embeddings.deterministic = true`` with all cores (workers = 0) and different hash
    seeds: the two builds' embeddings are the same bytes."""
    config = tmp_path / "det.toml"
    body = (project / "tiny.toml").read_text().split("[metrics.knn]")[0]
    config.write_text(body.replace("workers = 1          #", "deterministic = true #")
                      .replace('"hf:tokenizer.json"', f'"hf:{project / "tokenizer.json"}"'))
    assert "deterministic = true" in config.read_text()
    vectors = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = _cli("build", config, "--out", out, "-q", env=env)
        assert result.returncode == 0, result.stderr
        (entry,) = (out / "cache").glob("embed-*")
        vectors.append((entry / "vectors.npy").read_bytes())
        assert json.loads((entry / "meta.json").read_text())["params"]["workers"] == 1
    assert vectors[0] == vectors[1]


def test_a_changed_tree_default_rebuilds_only_the_tree(project, built, tmp_path, monkeypatch):
    """A tree's key holds every resolved constructor keyword, not only the table's: after a
    default changes (here ``follow_knn``), the cached tree is rebuilt, never served stale."""
    import shutil

    from vocabmetric.metrics import TreeBuilder

    out = tmp_path / "out"
    shutil.copytree(project / "reference", out)
    config = tmp_path / "tree.toml"
    config.write_text((project / "tiny.toml").read_text().replace('"hf:tokenizer.json"', f'"hf:{project / "tokenizer.json"}"')
                      + "\n[metrics.tree]\nn_trees = 2\nbranching = 2\n")
    first = build(config, out, progress=False)
    assert {r.name for r in first.stages if not r.cached} == {"metric-tree", "store"}
    again = build(config, out, progress=False)
    assert all(r.cached for r in again.stages)
    monkeypatch.setitem(TreeBuilder.__init__.__kwdefaults__, "follow_knn", 0)
    changed = build(config, out, progress=False)
    assert {r.name for r in changed.stages if not r.cached} == {"metric-tree", "store"}
    keys = {r.name: r.key for r in first.stages}
    assert {r.name: r.key for r in changed.stages}["metric-tree"] != keys["metric-tree"]
