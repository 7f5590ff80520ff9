"""Every ```python snippet of the README and docs/ runs as written (issue 28, point 4).

Each snippet runs alone, in a fresh namespace, in a directory where ``runs/demo/metric.zarr``
is a small store built here (a BPE tokenizer that has the docs' tokens: " London", " Paris",
" error", " beautiful") and ``pipelines/demo.toml`` its config, so ``vm.build`` of the
snippets finds every stage cached. A snippet preceded by ``<!-- not run: why -->`` is left
out (the TRL trainer needs a model; excerpts of a script the tests run whole); the address
``http://127.0.0.1:8000`` becomes a real server on loopback serving that store.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import LEE, REPO, lee_texts, serve_in_thread, train_bpe

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOC_WORDS = "London Paris error exception beautiful gorgeous".split()

CONFIG = """
[tokenizer]
spec = "hf:{tokenizer}"
[corpus]
sources = ["{lee}", "{extra}"]
[embeddings]
dim = 16
epochs = 3
min_count = 2
workers = 1
untrained = "compose"
[metrics.knn]
k = 16
[metrics.geodesic]
k_graph = 5
k = 32
[metrics.tree]
branching = 4
max_leaf_size = 8
n_trees = 2
[projection]
n_epochs = 10
"""


def snippets() -> list[tuple[str, str, str | None]]:
    """``(where, code, why not run)`` of every python block in the README and docs/."""
    out = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        n = 0
        while n < len(lines):
            if lines[n].strip() == "```python":
                end = next(e for e in range(n + 1, len(lines)) if lines[e].startswith("```"))
                skip = re.search(r"<!-- not run: (.*?) -->", "\n".join(lines[max(0, n - 2):n]))
                out.append((f"{path.relative_to(REPO)}:{n + 2}", "\n".join(lines[n + 1:end]) + "\n",
                            skip.group(1) if skip else None))
                n = end
            n += 1
    return out


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """A directory laid out as the docs assume: pipelines/demo.toml, runs/demo/metric.zarr."""
    from vocabmetric.building.pipeline import build

    root = tmp_path_factory.mktemp("docs")
    sentences = [f"The {a} {b} in London and Paris was beautiful, an error and an exception, gorgeous."
                 for a, b in zip(["report", "news", "story"] * 40, ["said", "showed", "told"] * 40)]
    extra = root / "extra.txt"
    extra.write_text("\n\n".join(sentences), encoding="utf-8")
    tokenizer = train_bpe(root / "tokenizer.json", vocab_size=700, texts=lee_texts() + sentences * 5)
    (root / "pipelines").mkdir()
    config = root / "pipelines" / "demo.toml"
    config.write_text(CONFIG.format(tokenizer=tokenizer, lee=LEE.as_posix(), extra=extra.as_posix()))
    build(config, root / "runs" / "demo", progress=False)
    return root


def test_the_docs_tokens_are_in_the_snippets_store(docs_dir):
    import vocabmetric as vm

    store = vm.open_store(docs_dir / "runs/demo/metric.zarr")
    for word in DOC_WORDS:
        assert store.usable[store.resolve(" " + word)], word


def test_every_snippet_is_run_or_says_why_not():
    found = snippets()
    assert len(found) >= 8
    assert sum(why is None for _, _, why in found) >= 7  # most run


@pytest.mark.parametrize("where,code,why", snippets(), ids=[w for w, _, _ in snippets()])
def test_snippet_runs(where, code, why, docs_dir, monkeypatch):
    if why:
        pytest.skip(f"{where}: {why}")
    monkeypatch.chdir(docs_dir)
    if "http://127.0.0.1:8000" in code:
        with serve_in_thread(docs_dir / "runs/demo/metric.zarr") as url:
            exec(compile(code.replace("http://127.0.0.1:8000", url), where, "exec"), {"__name__": "__snippet__"})
    else:
        exec(compile(code, where, "exec"), {"__name__": "__snippet__"})
