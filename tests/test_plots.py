"""``vocabmetric plot`` (the map, the neighbour costs) and ``benchmarks/plot_results.py``
(the benchmark charts), as real PNGs.

Each kind runs through the real command (typer's runner, in process) on the ``small_store``
fixture, and the benchmark chart through the script's ``main`` on a benchmark JSON written
here; the file must be a PNG of exactly the asked size whose pixels show what the plot
promises (the probe's colour, the red cap line, one line per regularizer).
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO
from vocabmetric.cli import app
from vocabmetric.errors import ConfigError, StoreError
from vocabmetric.query.plots import neighbor_costs, plot_map, visible


def load_plot_results():
    spec = importlib.util.spec_from_file_location("plot_results", REPO / "benchmarks" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_results = load_plot_results()
bench_rows, plot_bench = plot_results.bench_rows, plot_results.plot_bench

RUNNER = CliRunner()
PROBE_COLOR = (0x1F, 0x77, 0xB4)  # matplotlib's C0: the first probe
CAP_COLOR = (0xD6, 0x27, 0x28)


def png(path: Path) -> np.ndarray:
    """The image at ``path`` as (h, w, 3) uint8, after checking it is a PNG whose header
    size matches its decoded pixels."""
    import matplotlib.image

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    return (pixels[..., :3] * 255).round().astype(np.uint8)


def count_color(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(pixels.astype(int) - rgb).max(axis=2) <= tol).sum())


def plot_cli(*args) -> str:
    result = RUNNER.invoke(app, ["plot", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_map_png_has_the_asked_size_and_shows_the_probes(small_store, tmp_path):
    probe = next(i for i in np.argsort(-small_store.counts) if small_store.usable[i])
    out = tmp_path / "map.png"
    assert f"wrote {out}" in plot_cli(small_store.path, "--kind", "map", "--out", out, "--probe", str(probe), "--size", "900x700")
    pixels = png(out)
    assert pixels.shape == (700, 900, 3)
    assert count_color(pixels, PROBE_COLOR) > 200  # the probe and its neighbours, in the first colour
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a drawn map, not a blank page


def test_map_default_probes_are_spread_frequent_words(small_store, tmp_path):
    from vocabmetric.query.plots import default_probes

    probes = default_probes(small_store, n=3)
    assert len(set(probes)) == 3
    for i in probes:
        assert small_store.usable[i] and small_store.token_text(i).strip().isalpha()
    out = plot_map(small_store, tmp_path / "map.png", size=(640, 480))
    assert png(out).shape == (480, 640, 3)


def test_costs_png_marks_the_cap_of_every_metric(small_store, tmp_path):
    out = tmp_path / "costs.png"
    plot_cli(small_store.path, "--kind", "costs", "--out", out)
    pixels = png(out)
    assert pixels.shape == (60 + 220 * len(small_store.metrics), 1000, 3)  # one panel per metric by default
    # a red dashed cap line in every panel: red pixels in each horizontal band
    bands = np.array_split(np.arange(60, pixels.shape[0]), len(small_store.metrics))
    for metric, band in zip(small_store.metrics, bands):
        assert count_color(pixels[band], CAP_COLOR, tol=30) > 50, f"no cap line in the {metric} panel"

    one = tmp_path / "knn.png"
    plot_cli(small_store.path, "--kind", "costs", "--metric", "knn", "--out", one, "--size", "600x300")
    assert png(one).shape == (300, 600, 3)


def test_neighbor_costs_are_the_stored_costs_or_a_sample_of_exact_ones(small_store):
    op = small_store.operator("knn")
    costs, what = neighbor_costs(small_store, "knn")
    assert len(costs) == (op.indices >= 0).sum() and np.all(costs <= op.cap)
    assert "16 stored" in what
    l2, what = neighbor_costs(small_store, "l2", sample=5, k=3)
    assert len(l2) == 15 and "5 sampled" in what
    assert np.all((l2 >= 0) & (l2 <= 2))


BENCH = {
    "name": "regularizers",
    "machine": {"cpu": "test cpu", "cores": 2},
    "rows": [
        {"V": 1000, "N": 8, "regularizer": "full_kl", "seconds": 0.5, "peak_extra_mb": 10.0, "time_ratio": 1.0, "memory_ratio": 1.0},
        {"V": 1000, "N": 8, "regularizer": "tree", "seconds": 1.0, "peak_extra_mb": 5.0, "time_ratio": 2.0, "memory_ratio": 0.5},
        {"V": 1000, "N": 8, "regularizer": "sliced", "seconds": 2.0, "peak_extra_mb": 40.0},  # ratios left out
        {"V": 8000, "N": 8, "regularizer": "full_kl", "seconds": 4.0, "peak_extra_mb": 80.0, "time_ratio": 1.0, "memory_ratio": 1.0},
        {"V": 8000, "N": 8, "regularizer": "tree", "seconds": 6.0, "peak_extra_mb": 20.0, "time_ratio": 1.5, "memory_ratio": 0.25},
        {"V": 8000, "N": 8, "regularizer": "sliced", "skipped": "too slow"},
        {"V": 1000, "N": 64, "regularizer": "full_kl", "seconds": 3.0, "peak_extra_mb": 30.0, "time_ratio": 1.0, "memory_ratio": 1.0},
        {"V": 1000, "N": 64, "regularizer": "tree", "seconds": 3.0, "peak_extra_mb": 3.0, "time_ratio": 1.0, "memory_ratio": 0.1},
    ],
}


def test_bench_rows_drop_skipped_rows_and_fill_missing_ratios():
    rows = bench_rows(BENCH)
    assert len(rows) == 7
    sliced = next(r for r in rows if r["regularizer"] == "sliced")
    assert sliced["time_ratio"] == pytest.approx(2.0 / 0.5) and sliced["memory_ratio"] == pytest.approx(40.0 / 10.0)
    assert bench_rows(BENCH["rows"]) == rows  # a bare list of rows reads the same


def test_bench_png_has_one_row_of_panels_per_position_count(tmp_path):
    results = tmp_path / "regularizers.json"
    results.write_text(json.dumps(BENCH))
    out = tmp_path / "bench.png"
    assert plot_results.main([str(results), "--out", str(out)]) == 0
    pixels = png(out)
    assert pixels.shape == (80 + 360 * 2, 1200, 3)  # N = 8 and N = 64
    for c in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # tree (C0) and sliced (C1) are drawn
        assert count_color(pixels, c, tol=20) > 30


def test_bench_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing\.json do not exist; run .*benchmarks/regularizers\.py"):
        plot_bench(tmp_path / "nothing.json", tmp_path / "x.png")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json are not valid JSON"):
        plot_bench(bad, tmp_path / "x.png")
    with pytest.raises(ConfigError, match="no measured rows"):
        plot_bench({"rows": [{"V": 1, "N": 1, "regularizer": "tree", "skipped": "x"}]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments_are_one_clear_error(small_store, tmp_path):
    untrained = int(np.flatnonzero(~small_store.usable)[0])
    with pytest.raises(StoreError, match=f"id {untrained}.*has no vector"):
        plot_map(small_store, tmp_path / "m.png", probes=[untrained])
    with pytest.raises(StoreError, match="no metric 'cosine'"):
        plot_map(small_store, tmp_path / "m.png", metric="cosine")
    for args, message in ((["--kind", "pie"], "--kind 'pie': use one of map, costs"),
                          (["--size", "big"], "--size: expected WIDTHxHEIGHT"),
                          (["--size", "50x50"], "at least 100x100 pixels"),
                          (["--probe", "no such token at all"], "no token has the text")):
        result = RUNNER.invoke(app, ["plot", str(small_store.path), "--out", str(tmp_path / "m.png"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m.png").exists()


def test_visible_marks_whitespace_like_the_page():
    assert visible(" the") == "␣the"
    assert visible("a\tb\n") == "a⇥b↵"
    assert visible("") == "∅"
