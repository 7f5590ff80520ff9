"""Config errors found before any work, in one line with exit status 2 (issue 28, point 3):
a neighbour count the vocabulary cannot hold, an --out that is a file or cannot be made, a
tokenizer kind typo; each named with the ``file: key:`` prefix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import LEE, train_bpe
from vocabmetric.cli import app
from vocabmetric.errors import ConfigError
from vocabmetric.building.pipeline import build

runner = CliRunner()

CONFIG = """
[tokenizer]
spec = "{spec}"
[corpus]
sources = ["{lee}"]
[embeddings]
dim = 8
epochs = 1
[metrics.knn]
k = {k}
"""


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400)


def write(tmp_path, tokenizer_json, *, k=8, spec=None):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG.format(spec=spec or f"hf:{tokenizer_json}", lee=LEE.as_posix(), k=k))
    return path


def test_k_beyond_the_vocabulary_fails_before_the_corpus_is_read(tmp_path, tokenizer_json):
    config = write(tmp_path, tokenizer_json, k=10000)
    with pytest.raises(ConfigError) as err:
        build(config, tmp_path / "out", progress=False)
    message = str(err.value)
    assert message.startswith(f"{config}: metrics.knn.k: 10000 must be smaller than the 399 tokens with a text")
    assert not (tmp_path / "out").exists()  # nothing made, nothing tokenized


def test_projection_neighbours_are_checked_too(tmp_path, tokenizer_json):
    config = write(tmp_path, tokenizer_json)
    config.write_text(config.read_text() + "[projection]\nn_neighbors = 500\n")
    with pytest.raises(ConfigError, match=r"projection.n_neighbors: 500 must be smaller than the 399"):
        build(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line_and_status_2(tmp_path, tokenizer_json, where):
    config = write(tmp_path, tokenizer_json)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    out = a_file if where == "file" else a_file / "sub"
    result = runner.invoke(app, ["build", str(config), "--out", str(out)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: --out {out}")
    assert a_file.read_text() == "x"


def test_a_tokenizer_kind_typo_has_the_file_key_prefix_and_a_hint(tmp_path, tokenizer_json):
    config = write(tmp_path, tokenizer_json, spec=f"hugging:{tokenizer_json}")
    result = runner.invoke(app, ["build", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {config}: tokenizer.spec: 'hugging:")
    assert f"did you mean 'hf:{tokenizer_json}'?" in result.stderr


def test_an_unknown_tiktoken_encoding_has_the_file_key_prefix(tmp_path, tokenizer_json):
    config = write(tmp_path, tokenizer_json, spec="tiktoken:cl99k_base")
    result = runner.invoke(app, ["build", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith(f"error: {config}: tokenizer.spec: ")
