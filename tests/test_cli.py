"""The ``vocabmetric`` command on the small real store: neighbors, cost, export, info, and
its error exits (non-zero, the problem named on stderr)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vocabmetric.cli import app
from vocabmetric.errors import VocabMetricError

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def spaced(small_store):
    """A trained token with a leading space whose text names only it, and whose knn
    neighbours include another leading-space token."""
    s = small_store
    for i in np.flatnonzero(s.usable):
        text = s.token_text(i)
        if not (text.startswith(" ") and len(text) > 3 and text[1:].isalpha()):
            continue
        try:
            if s.resolve(text) != i:
                continue
        except VocabMetricError:
            continue
        if any(n.text.startswith(" ") for n in s.neighbors(i, k=5, metric="knn")):
            return int(i)
    pytest.fail("no leading-space token with leading-space neighbours in the small store")


def _rows(table: str) -> list[list[str]]:
    """The body rows of a neighbour table (after the title, header and rule lines)."""
    lines = table.strip().splitlines()
    assert lines[1].split() == ["rank", "id", "token", "cost", "provenance"], table
    assert set(lines[2].replace(" ", "")) == {"-"}
    return [line.split() for line in lines[3:]]


def test_neighbors_prints_rank_id_visible_text_and_cost(small_store, spaced):
    text = small_store.token_text(spaced)
    result = invoke("neighbors", small_store.path, text, "-k", 5, "--metric", "knn")
    assert result.exit_code == 0, result.output
    expected = small_store.neighbors(spaced, k=5, metric="knn")
    title = result.stdout.splitlines()[0]
    assert "␣" + text[1:] in title and f"id {spaced}" in title and "knn" in title
    rows = _rows(result.stdout)
    assert len(rows) == len(expected) == 5
    for rank, (row, n) in enumerate(zip(rows, expected), start=1):
        assert row[0] == str(rank) and row[1] == str(n.id)
        assert row[2] == n.text.replace(" ", "␣")  # the leading space is shown, never blank
        assert float(row[3]) == pytest.approx(n.cost, abs=5e-5)
        assert row[4] == small_store.provenance_of(n.id)
    assert any(row[2].startswith("␣") for row in rows)


@pytest.mark.parametrize("metric", ["knn", "geodesic", "l2", "tree"])
def test_neighbors_json_equals_the_api(small_store, spaced, metric):
    result = invoke("neighbors", small_store.path, str(spaced), "-k", 6, "--metric", metric, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{**n._asdict(), "provenance": small_store.provenance_of(n.id)}
                                         for n in small_store.neighbors(spaced, k=6, metric=metric)]


@pytest.mark.parametrize("metric", ["l2", "knn", "tree"])
def test_cost_prints_the_api_cost(small_store, spaced, metric):
    near = small_store.neighbors(spaced, k=1, metric=metric)[0]
    for b in (str(near.id), "7"):
        result = invoke("cost", small_store.path, small_store.token_text(spaced), b, "--metric", metric)
        assert result.exit_code == 0, result.output
        assert float(result.stdout) == pytest.approx(small_store.cost(spaced, b, metric), rel=1e-5)
    assert float(invoke("cost", small_store.path, spaced, spaced, "-m", metric).stdout) == 0.0


@pytest.mark.parametrize("metric", ["knn", "geodesic", "umap"])
def test_export_round_trips_the_operator(small_store, tmp_path, metric):
    out = tmp_path / "sub" / f"{metric}.npz"
    result = invoke("export", small_store.path, "--metric", metric, "--out", out)
    assert result.exit_code == 0, result.output
    op = small_store.operator(metric)
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["indices"], op.indices)
        np.testing.assert_array_equal(npz["costs"], op.costs)
        assert float(npz["cap"]) == op.cap
        assert str(npz["fingerprint"]) == small_store.fingerprint
    assert not list(out.parent.glob("*.tmp*"))


def test_export_tree_round_trips_the_tree(small_store, tmp_path):
    out = tmp_path / "tree.npz"
    assert invoke("export", small_store.path, "-m", "tree", "-o", out).exit_code == 0
    tree = small_store.tree()
    with np.load(out) as npz:
        for field in ("parent", "weight", "leaf_of_token"):
            np.testing.assert_array_equal(npz[field], getattr(tree, field))
        if small_store.n_trees > 1:
            from vocabmetric import TreeEnsemble

            back = TreeEnsemble.from_arrays(npz["parent"], npz["weight"], npz["leaf_of_token"], npz["offsets"])
            a, b = np.arange(0, 40), np.arange(40, 80)
            np.testing.assert_allclose(back.distance(a, b), tree.distance(a, b))


def test_info_lists_the_store(small_store):
    result = invoke("info", small_store.path)
    assert result.exit_code == 0, result.output
    assert f"{small_store.vocab_size:,} ids" in result.stdout
    metric_rows = {line.split()[0] for line in result.stdout.splitlines() if line.split()}
    assert set(small_store.metrics) <= metric_rows
    as_json = json.loads(invoke("info", small_store.path, "--json").stdout)
    assert as_json == json.loads(json.dumps(small_store.info()))


# -- error exits -------------------------------------------------------------------------------
def test_missing_store_is_an_error_exit_naming_it(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    for args in (("neighbors", missing, " the"), ("cost", missing, "1", "2"), ("info", missing),
                 ("export", missing, "-m", "knn", "-o", tmp_path / "x.npz")):
        result = invoke(*args)
        assert result.exit_code != 0
        assert str(missing) in result.stderr and "not a vocabmetric store" in result.stderr
        assert result.stdout == ""


def test_unknown_metric_is_an_error_exit_listing_the_metrics(small_store, tmp_path):
    for args in (("neighbors", small_store.path, "5", "--metric", "cosine"), ("cost", small_store.path, "5", "6", "-m", "cosine"),
                 ("export", small_store.path, "-m", "cosine", "-o", tmp_path / "x.npz")):
        result = invoke(*args)
        assert result.exit_code != 0
        assert "'cosine'" in result.stderr and "geodesic" in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_export_of_the_exact_l2_says_it_has_no_stored_operator(small_store, tmp_path):
    result = invoke("export", small_store.path, "-m", "l2", "-o", tmp_path / "l2.npz")
    assert result.exit_code != 0 and "'l2'" in result.stderr and "exactly on demand" in result.stderr


def test_unknown_token_is_an_error_exit_naming_it(small_store):
    result = invoke("neighbors", small_store.path, " zzqqxx")
    assert result.exit_code != 0 and "' zzqqxx'" in result.stderr
    result = invoke("cost", small_store.path, "5", str(small_store.vocab_size + 3))
    assert result.exit_code != 0 and str(small_store.vocab_size + 3) in result.stderr and "out of range" in result.stderr


def test_serve_on_a_missing_store_exits_before_serving(tmp_path):
    exe = Path(sys.executable).with_name("vocabmetric")
    done = subprocess.run([str(exe), "serve", str(tmp_path / "none.zarr"), "--port", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "none.zarr" in done.stderr and "not a vocabmetric store" in done.stderr


# -- issue 16: tokens, verify, serve on a damaged store -----------------------------------------
@pytest.mark.parametrize("text", ["①", "٣", "１２"])
def test_a_non_ascii_digit_token_is_a_text_not_an_id(small_store, text):
    """``str.isdigit`` is true for these; ``int()`` fails on ① and reads ٣ as 3: both wrong."""
    assert not small_store.ids_of_text(text)
    for args in (("neighbors", small_store.path, text), ("cost", small_store.path, text, "5")):
        result = invoke(*args)
        assert result.exit_code == 2, (result.output, result.exception)
        assert f"no token has the text {text!r}" in result.stderr


def test_a_digit_string_too_long_for_an_id_is_an_error_exit(small_store):
    result = invoke("neighbors", small_store.path, "9" * 5000)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "5000 digits" in result.stderr and "out of range" in result.stderr


@pytest.fixture()
def store_copy(small_store, tmp_path):
    """A copy of the small store to damage."""
    import shutil

    return Path(shutil.copytree(small_store.path, tmp_path / "copy.zarr"))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _embeddings_chunk(store: Path) -> Path:
    return sorted(p for p in (store / "embeddings" / "c").rglob("*") if p.is_file())[0]


def test_verify_checks_every_file_of_a_sound_store(small_store):
    manifest = json.loads((small_store.path / "manifest.json").read_text())
    result = invoke("verify", small_store.path)
    assert result.exit_code == 0, result.output
    assert f"{len(manifest['files'])} files checked" in result.stdout and "all match" in result.stdout


def test_verify_names_the_damaged_file_and_exits_1(store_copy):
    chunk = _embeddings_chunk(store_copy)
    _flip_a_byte(chunk)
    result = invoke("verify", store_copy)
    assert result.exit_code == 1, result.output
    assert chunk.relative_to(store_copy).as_posix() in result.stderr and "vocabmetric build" in result.stderr
    chunk.unlink()
    result = invoke("verify", store_copy)
    assert result.exit_code == 1 and "missing" in result.stderr


def test_verify_of_a_store_without_a_manifest_says_unverified(store_copy):
    (store_copy / "manifest.json").unlink()
    result = invoke("verify", store_copy)
    assert result.exit_code == 1 and "unverified" in result.stderr


def test_serve_on_a_damaged_store_prints_one_line_and_exits(store_copy):
    """The store opens (sizes match) but an array fails its hash when the app loads it: one
    clear line naming the file, no traceback, a non-zero exit, before anything is served."""
    chunk = _embeddings_chunk(store_copy)
    _flip_a_byte(chunk)
    exe = Path(sys.executable).with_name("vocabmetric")
    for workers in ("1", "2"):
        done = subprocess.run([str(exe), "serve", str(store_copy), "--port", "1", "--workers", workers],
                              capture_output=True, text=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert len(errors) == 1 and chunk.relative_to(store_copy).as_posix() in errors[0], done.stderr
