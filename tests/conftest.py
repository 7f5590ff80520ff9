"""Shared fixtures: a small real store built by the real pipeline.

``small_store`` trains a byte-level BPE tokenizer (HF ``tokenizers``) on the Lee corpus in
``data/``, runs the whole pipeline (tokenize → word2vec → knn, geodesic, umap, tree) and
opens the store. Built once per test session (about 20 s on 2 cores).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
LEE = DATA / "lee_background.txt.gz"


def lee_texts() -> list[str]:
    with gzip.open(LEE, "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def train_bpe(path: Path, vocab_size: int = 1000, texts: list[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (default: the Lee corpus) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or lee_texts(), trainer)
    tok.save(str(path))
    return path


SMALL_CONFIG = """
[tokenizer]
spec = "hf:tokenizer.json"

[corpus]
sources = ["{lee}"]

[embeddings]
dim = 32
epochs = 10
min_count = 3
workers = 2
seed = 1

[metrics.knn]
k = 16

[metrics.geodesic]
k_graph = 5
k = 32

[metrics.umap]
n_components = 2
k = 8
n_neighbors = 8
n_epochs = 50

[metrics.tree]
branching = 4
max_leaf_size = 8
"""


@pytest.fixture(scope="session")
def small_build(tmp_path_factory):
    """``(config_path, BuildResult)`` of the small pipeline (built once per session)."""
    from vocabmetric.pipeline import build

    root = tmp_path_factory.mktemp("small-build")
    train_bpe(root / "tokenizer.json")
    config = root / "small.toml"
    config.write_text(SMALL_CONFIG.format(lee=LEE.as_posix()))
    return config, build(config, root / "out", progress=False)


@pytest.fixture(scope="session")
def small_store(small_build):
    """The small pipeline's store, opened (read-only; do not modify it in a test)."""
    from vocabmetric import open_store

    return open_store(small_build[1].store_path)
