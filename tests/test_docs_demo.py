"""The README's example outputs are the current demo store's (issue 28, point 4).

The README shows what `make run` prints (the build report's head and its ␣London table, from
:func:`vocabmetric.query.report.side_by_side`), what ``store.neighbors(" error", k=3)`` returns and
the l2 Spearman figures of ``vocabmetric eval``. This test recomputes each from the demo
store and compares it with the README's text; it skips without a demo store (``make run``
writes runs/demo/metric.zarr; ``VOCABMETRIC_DEMO_STORE`` names another). After a rebuild
that changes them, paste the new outputs (the failure message shows them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import REPO

DEMO = Path(os.environ.get("VOCABMETRIC_DEMO_STORE", REPO / "runs/demo/metric.zarr"))
README = (REPO / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.skipif(not (DEMO / "zarr.json").is_file(),
                                reason=f"no demo store at {DEMO} (`make run`, or set VOCABMETRIC_DEMO_STORE)")


@pytest.fixture(scope="module")
def demo():
    from vocabmetric import open_store

    return open_store(DEMO)


def _words(line: str) -> list[str]:
    return line.split()


def _report_block() -> list[str]:
    start = README.index("vocabulary     ")
    return README[start: README.index("```", start)].strip().splitlines()


def test_the_report_head_is_the_demo_stores(demo):
    from vocabmetric.query.report import provenance_line

    info = demo.info()
    head = {line.split()[0]: line for line in _report_block()[:3]}
    assert _words(head["vocabulary"]) == _words(f"vocabulary {demo.vocab_size:,} token ids")
    trained = info["embeddings"]["n_trained"]
    assert _words(head["trained"]) == _words(f"trained {trained:,} of {demo.vocab_size:,} ids "
                                             f"({100 * trained / demo.vocab_size:.1f}%)")
    assert _words(head["provenance"]) == _words("provenance " + provenance_line(info["embeddings"]["provenance"]))


def test_the_london_table_is_the_demo_stores(demo):
    from vocabmetric.query.report import side_by_side

    block = _report_block()
    title = next(n for n, line in enumerate(block) if line.startswith("nearest to ␣London"))
    header, rows = block[title + 1], block[title + 2:]
    metrics = [w for w in _words(header)[1:] if w != "cost"]
    table = side_by_side(demo, demo.resolve(" London"), metrics, len(rows)).splitlines()
    want = [_words(line) for line in [table[0], table[1], *table[3: 3 + len(rows)]]]  # title, header, rows (no rule)
    assert [_words(block[title]), _words(header), *map(_words, rows)] == want, "\n".join(table)


def test_the_neighbors_output_is_the_demo_stores(demo):
    shown = re.search(r'store\.neighbors\(" error", k=3, metric="knn"\)\n# \[Neighbor\(id=(\d+), text=(\'.*?\'), '
                      r'cost=([\d.]+)\), Neighbor\(id=(\d+), text=(\'.*?\')', README)
    assert shown, "the README's store.neighbors(' error') example is missing"
    got = demo.neighbors(" error", k=3, metric="knn")
    assert (int(shown[1]), shown[2], shown[3], int(shown[4]), shown[5]) == \
        (got[0].id, repr(got[0].text), f"{got[0].cost:.3f}", got[1].id, repr(got[1].text)), got


def test_the_eval_figures_are_the_demo_stores(demo):
    from vocabmetric.query.evaluation import evaluate

    shown = re.search(r"all-pairs l2 Spearman ([\d.]+) / ([\d.]+)", README)
    rows = {r.dataset: r for r in evaluate(demo, ["l2"])}
    assert (shown[1], shown[2]) == (f"{rows['wordsim353'].spearman_all:.3f}", f"{rows['simlex999'].spearman_all:.3f}"), rows
