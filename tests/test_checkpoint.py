"""Import from a model's own checkpoint: sharded bf16 save_pretrained directories (Llama and
Qwen2, tied and untied, the vocabulary padded past the tokenizer), single files, and every
bad input named."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import lee_texts, train_bpe
from vocabmetric.building.checkpoint import load_matrix, read_rows, safetensors_header
from vocabmetric.building.embeddings import import_embeddings
from vocabmetric.errors import ConfigError, TokenizerError

PAD_TO = 64


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400, texts=lee_texts()[:150])


@pytest.fixture(scope="module")
def vocab_size(tokenizer_file) -> int:
    from vocabmetric import load_tokenizer

    return load_tokenizer(f"hf:{tokenizer_file}").vocab_size


def _model(arch: str, tie: bool, vocab: int, seed: int = 0):
    """A small random-weight transformers model (nothing downloaded), its vocabulary ``vocab`` rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tie)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def _save(model, directory: Path, tokenizer_file: Path | None = None) -> Path:
    """bf16, sharded into several files by a small ``max_shard_size``; the tokenizer beside it."""
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="60KB")
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, directory / "tokenizer.json")
    assert len(list(directory.glob("*.safetensors"))) >= 3
    return directory


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def saved(request, tmp_path_factory, tokenizer_file, vocab_size):
    arch, tie = request.param
    padded = -(-vocab_size // PAD_TO) * PAD_TO + PAD_TO  # a head padded past the tokenizer
    model = _model(arch, tie, padded)
    directory = _save(model, tmp_path_factory.mktemp(arch) / "model", tokenizer_file)
    input_rows = model.get_input_embeddings().weight.detach().float().numpy()
    output_rows = model.get_output_embeddings().weight.detach().float().numpy()
    return directory, tie, padded, input_rows, output_rows


def test_stored_rows_are_the_models_own(saved, vocab_size):
    directory, tie, padded, input_rows, output_rows = saved
    inp = load_matrix(directory, vocab_size, matrix="input")
    assert inp.vectors.dtype == np.float32 and inp.vectors.shape == (vocab_size, 64)
    assert np.array_equal(inp.vectors, input_rows[:vocab_size])  # bf16 → float32 is exact
    assert (inp.tensor, inp.dtype, inp.rows, inp.dropped_rows) == ("model.embed_tokens.weight", "BF16", padded,
                                                                   padded - vocab_size)
    out = load_matrix(directory, vocab_size, matrix="output")
    assert np.array_equal(out.vectors, output_rows[:vocab_size])
    assert out.tied is tie and out.tensor == ("model.embed_tokens.weight" if tie else "lm_head.weight")
    if not tie:
        assert not np.array_equal(out.vectors, inp.vectors)


def test_slices_and_single_files_read_the_same_rows(saved, vocab_size, tmp_path):
    directory, _, _, input_rows, _ = saved
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = directory / index["model.embed_tokens.weight"]
    entry = safetensors_header(shard)["model.embed_tokens.weight"]
    one_row_at_a_time = read_rows(entry, vocab_size, slice_bytes=1)
    assert np.array_equal(one_row_at_a_time, input_rows[:vocab_size])
    emb = import_embeddings(shard, vocab_size)  # one shard file on its own
    assert np.array_equal(emb.vectors, input_rows[:vocab_size])
    assert emb.params["dropped_rows"] == len(input_rows) - vocab_size and emb.params["dtype"] == "BF16"


def test_bf16_and_f16_special_values_convert_exactly(tmp_path):
    from safetensors.torch import save_file

    wide = torch.tensor([[0.0, -0.0, 1.0, -2.5], [1e-40, -3e38, 3e38, 6e-8], [0.1, 1 / 3, 7.0, 1e-5]])
    half = torch.tensor([[0.0, -0.0, 1.0, -2.5], [6e-8, -65504.0, 65504.0, 1e-4], [0.1, 1 / 3, 7.0, 1e-5]])
    for dtype, code, values in ((torch.bfloat16, "BF16", wide), (torch.float16, "F16", half),
                                (torch.float32, "F32", wide)):
        path = tmp_path / f"{code}.safetensors"
        save_file({"wte.weight": values.to(dtype)}, str(path))
        got = load_matrix(path, 3)
        assert got.dtype == code
        expected = values.to(dtype).float().numpy()
        assert np.array_equal(got.vectors.view(np.uint32), expected.view(np.uint32)), code  # -0.0 too


def test_only_the_embedding_tensor_is_read(tmp_path):
    """Peak memory ≈ the float32 result plus one slice, beside a tensor 16× the matrix's size."""
    from safetensors.torch import save_file

    rows, dim = 4096, 64
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(rows, dim).to(torch.bfloat16),
               "model.layers.0.mlp.weight": torch.randn(16 * rows, dim).to(torch.bfloat16)}, str(path))
    tracemalloc.start()
    try:
        got = load_matrix(path, rows, slice_bytes=64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.vectors.nbytes == rows * dim * 4
    assert peak < got.vectors.nbytes + (256 << 10), peak


def test_build_from_a_model_directory_with_no_corpus(tmp_path, tokenizer_file, vocab_size):
    from vocabmetric import open_store
    from vocabmetric.building.pipeline import build
    from vocabmetric.query.report import build_report, info_table

    padded = vocab_size + 37
    model = _model("qwen2", False, padded, seed=3)
    _save(model, tmp_path / "my model", tokenizer_file)
    config = tmp_path / "import.toml"
    config.write_text('[tokenizer]\nspec = "hf:my model"\n\n[embeddings]\nmethod = "import"\npath = "my model"\n'
                      'matrix = "output"\n\n[metrics.knn]\nk = 4\n')
    result = build(config, tmp_path / "out", progress=False)
    store = open_store(result.store_path)
    expected = model.get_output_embeddings().weight.detach().float().numpy()[:vocab_size]
    assert np.array_equal(store.embeddings(), expected)
    assert store.attrs["tokenizer"]["spec"].endswith("my model")
    assert store.attrs["corpus"]["absent"] is True and not store.counts.any()
    params = store.attrs["embeddings"]["params"]
    assert (params["tensor"], params["matrix"], params["tied"], params["dropped_rows"]) == (
        "lm_head.weight", "output", False, 37)
    assert "tokenize" not in [r.name for r in result.stages]
    assert "knn" in store.metrics
    for text in (info_table(store), build_report(result)):
        assert "corpus" in text and "no [corpus]" in text and "token counts are absent" in text
    assert "37 rows past the tokenizer dropped" in info_table(store)
    again = build(config, tmp_path / "out", progress=False)
    assert all(r.cached for r in again.stages)


def test_imported_embeddings_build_the_sharpened_knn_and_the_ward_tree_by_default(tmp_path, tokenizer_file, vocab_size):
    from vocabmetric import open_store
    from vocabmetric.building.pipeline import build
    from vocabmetric.query.report import info_table

    directory = _save(_model("llama", True, vocab_size, seed=5), tmp_path / "m", tokenizer_file)
    config = tmp_path / "defaults.toml"
    config.write_text(f'[tokenizer]\nspec = "hf:{directory}"\n[embeddings]\nmethod = "import"\npath = "{directory}"\n'
                      '[metrics.knn]\nk = 16\n[metrics.tree]\n')
    store = open_store(build(config, tmp_path / "out", progress=False).store_path)
    shape = store.metric_attrs("knn")["shape"]
    assert shape["shape"] == "fraction" and shape["fraction"] == 0.2 and shape["rank"] == 10
    tree = store.metric_attrs("tree")
    assert tree["builder"] == "ward" and tree["top_size"] == 256 and tree["shape"]["shape"] == "fraction"
    assert "fraction" in info_table(store)
    config.write_text(config.read_text() + "n_trees = 2\n")  # two Ward trees, on halves of the coordinates
    forest = open_store(build(config, tmp_path / "out", progress=False).store_path)
    assert forest.metric_attrs("tree")["builder"] == "ward" and forest.metric_attrs("tree")["n_trees"] == 2
    assert len(forest.tree().trees) == 2


def test_a_tied_head_is_said_in_the_store(tmp_path, tokenizer_file, vocab_size):
    from vocabmetric import open_store
    from vocabmetric.building.pipeline import build
    from vocabmetric.query.report import info_table

    model = _model("llama", True, vocab_size)
    directory = _save(model, tmp_path / "tied", tokenizer_file)
    config = tmp_path / "tied.toml"
    config.write_text(f'[tokenizer]\nspec = "hf:{directory}"\n[embeddings]\nmethod = "import"\n'
                      f'path = "{directory}"\nmatrix = "output"\n')
    store = open_store(build(config, tmp_path / "out", progress=False).store_path)
    assert store.attrs["embeddings"]["params"]["tied"] is True
    assert "tied to the input embeddings" in info_table(store)
    assert np.array_equal(store.embeddings(), model.get_input_embeddings().weight.detach().float().numpy())


# -- bad input -------------------------------------------------------------------------------
def _st(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model directory .* holds no \*\.safetensors.*pytorch_model\.bin"
                                          r".*save_pretrained"):
        load_matrix(tmp_path, 10)


def test_directory_without_tokenizer_json(tmp_path):
    from vocabmetric import load_tokenizer
    from vocabmetric.building.pipeline import load_config

    (tmp_path / "model").mkdir()
    with pytest.raises(TokenizerError, match=r"model directory .*model has no tokenizer\.json"):
        load_tokenizer(f"hf:{tmp_path / 'model'}")
    config = tmp_path / "c.toml"
    config.write_text('[tokenizer]\nspec = "hf:model"\n[embeddings]\nmethod = "import"\npath = "model"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: tokenizer\.spec: model directory .*model has no tokenizer\.json"):
        load_config(config)


def test_no_corpus_needs_import(tmp_path, tokenizer_file):
    from vocabmetric.building.pipeline import load_config

    config = tmp_path / "c.toml"
    config.write_text(f'[tokenizer]\nspec = "hf:{tokenizer_file}"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: corpus: required.*embeddings\.method = 'import'"):
        load_config(config)


def test_index_naming_a_missing_shard(tmp_path, vocab_size):
    directory = _save(_model("llama", False, vocab_size), tmp_path / "m")
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    gone = index["model.layers.1.mlp.down_proj.weight"]
    (directory / gone).unlink()
    with pytest.raises(ConfigError, match=rf"model\.safetensors\.index\.json names shard.* not in .*: {gone}"):
        load_matrix(directory, vocab_size)


def test_no_candidate_and_several_candidates_are_listed(tmp_path):
    m = torch.zeros(10, 4)
    path = _st(tmp_path / "plain.safetensors", {"a": m, "b": m.clone()})
    with pytest.raises(ConfigError, match=r"plain\.safetensors: no tensor named like an embedding.*"
                                          r"embeddings\.tensor.*it has: a, b"):
        load_matrix(path, 10)
    path = _st(tmp_path / "vlm.safetensors", {"language_model.embed_tokens.weight": m, "vision.embed_tokens.weight": m.clone()})
    with pytest.raises(ConfigError, match=r"vlm\.safetensors: several candidate tensors: language_model\.embed_tokens"
                                          r"\.weight, vision\.embed_tokens\.weight"):
        load_matrix(path, 10)
    assert load_matrix(path, 10, tensor="vision.embed_tokens.weight").tensor == "vision.embed_tokens.weight"
    with pytest.raises(ConfigError, match=r"vlm\.safetensors has no tensor 'wte'"):
        load_matrix(path, 10, tensor="wte")


def test_output_matrix_of_an_untied_checkpoint_without_a_head(tmp_path):
    _st(tmp_path / "model.safetensors", {"model.embed_tokens.weight": torch.zeros(10, 4)})
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with pytest.raises(ConfigError, match=r"does not tie the embeddings.*no LM head.*embeddings\.tensor"):
        load_matrix(tmp_path, 10, matrix="output")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors: no LM head tensor.*no config\.json"):
        load_matrix(tmp_path / "model.safetensors", 10, matrix="output")


def test_fewer_rows_than_ids_names_both_numbers(tmp_path):
    path = _st(tmp_path / "small.safetensors", {"wte.weight": torch.zeros(30, 4, dtype=torch.bfloat16)})
    with pytest.raises(ConfigError, match=r"small\.safetensors.*30 rows but the tokenizer has 50 ids"):
        load_matrix(path, 50)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_row_is_named(tmp_path, bad):
    m = torch.randn(40, 4)
    m[23, 1] = bad
    path = _st(tmp_path / "diverged.safetensors", {"wte.weight": m.to(torch.bfloat16)})
    with pytest.raises(ConfigError, match=r"diverged\.safetensors: tensor 'wte\.weight' row 23 .*NaN or inf"):
        load_matrix(path, 40, slice_bytes=64)
    assert load_matrix(path, 23).vectors.shape == (23, 4)  # a bad row past the tokenizer is never read


def test_truncated_and_non_float_tensors(tmp_path):
    path = _st(tmp_path / "cut.safetensors", {"wte.weight": torch.zeros(100, 8)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConfigError, match=r"cut\.safetensors: tensor 'wte\.weight' runs past the end.*truncated"):
        load_matrix(path, 100)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ConfigError, match=r"cannot read .*cut\.safetensors as safetensors.*corrupt"):
        load_matrix(path, 100)
    path = _st(tmp_path / "ids.safetensors", {"wte.weight": torch.zeros(10, 2, dtype=torch.int64)})
    with pytest.raises(ConfigError, match=r"ids\.safetensors: tensor 'wte\.weight' is I64"):
        load_matrix(path, 10)
