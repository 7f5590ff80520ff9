"""Tokenizer adapters against real tokenizers: OpenAI's BPE encodings and an HF tokenizer.json."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import lee_texts, train_bpe
from vocabmetric.errors import TokenizerError, VocabMetricError
from vocabmetric.vocab.tokenizer import load_tokenizer

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    " beautiful gorgeous  double  spaces\ttabs\nnewlines\r\n",
    "naïve café — Zürich, 東京, Москва, 😀👍🏽",
    "<|endoftext|> is ordinary text in a corpus, not a special token",
    "def f(x):\n    return x ** 2  # 10000 + 3.14159",
    "",
]
# tiktoken's cl100k_base: ranks 0..100255, specials <|endoftext|>=100257, <|fim_prefix|>=100258,
# <|fim_middle|>=100259, <|fim_suffix|>=100260, <|endofprompt|>=100276; every other id is a gap.
CL100K_SPECIALS = {100257: b"<|endoftext|>", 100258: b"<|fim_prefix|>", 100259: b"<|fim_middle|>",
                   100260: b"<|fim_suffix|>", 100276: b"<|endofprompt|>"}
CL100K_GAPS = {100256, *range(100261, 100276)}


@pytest.fixture(scope="module")
def cl100k():
    return load_tokenizer("tiktoken:cl100k_base")


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("hf") / "tokenizer.json", vocab_size=600, texts=lee_texts()[:120])


def _round_trip(tok, text: str) -> bytes:
    ids = tok.encode(text)
    return b"".join(tok.token_bytes(int(i)) for i in ids)


def test_cl100k_every_id_addressable_with_gaps_and_specials(cl100k):
    assert cl100k.vocab_size == 100277
    all_bytes = [cl100k.token_bytes(i) for i in range(cl100k.vocab_size)]
    empty = {i for i, b in enumerate(all_bytes) if not b}
    assert empty == CL100K_GAPS
    assert set(cl100k.special_ids) == set(CL100K_SPECIALS)
    for i, b in CL100K_SPECIALS.items():
        assert all_bytes[i] == b
    # BPE ranks are unique byte strings: no two ids share bytes
    non_empty = [b for b in all_bytes if b]
    assert len(set(non_empty)) == len(non_empty)
    # the 256 single bytes are all tokens
    assert {b for b in non_empty if len(b) == 1} == {bytes([x]) for x in range(256)}


@pytest.mark.parametrize("text", SAMPLES)
def test_cl100k_byte_round_trip(cl100k, text):
    ids = cl100k.encode(text)
    assert ids.dtype == np.uint32
    assert _round_trip(cl100k, text) == text.encode()
    assert not set(ids.tolist()) & set(cl100k.special_ids), "special strings in text must stay ordinary"


def test_encode_batch_matches_single_encodes(cl100k):
    batch = cl100k.encode_batch(SAMPLES)
    assert len(batch) == len(SAMPLES)
    for text, ids in zip(SAMPLES, batch):
        assert np.array_equal(ids, cl100k.encode(text))


def test_find_and_token_text_keep_the_leading_space(cl100k):
    ids = cl100k.find(" beautiful")
    assert len(ids) == 1
    (i,) = ids
    assert cl100k.token_bytes(i) == b" beautiful"
    assert cl100k.token_text(i) == " beautiful"
    assert cl100k.encode(" beautiful").tolist() == [i]
    assert cl100k.find("beautiful") != ids  # the leading space is part of the token
    assert cl100k.find("no such token, surely") == []


def test_token_text_of_a_partial_utf8_token_is_readable(cl100k):
    # the first byte of a 3-byte character is a token of its own (a single byte)
    (i,) = cl100k.find("\\xe6")
    assert cl100k.token_bytes(i) == b"\xe6"


def test_o200k_loads_and_round_trips():
    tok = load_tokenizer("tiktoken:o200k_base")
    assert tok.vocab_size > 200_000
    assert tok.token_bytes(tok.vocab_size - 1)  # the last id is a special token, addressable
    assert max(tok.special_ids) == tok.vocab_size - 1
    for text in SAMPLES:
        assert _round_trip(tok, text) == text.encode()
    assert len(tok.find(" beautiful")) == 1


def test_fingerprint_stable_across_loads_and_distinct_between_tokenizers(cl100k, hf_path, tmp_path):
    again = load_tokenizer("tiktoken:cl100k_base")
    assert again.fingerprint == cl100k.fingerprint
    assert len(cl100k.fingerprint) == 64 and int(cl100k.fingerprint, 16) >= 0
    hf = load_tokenizer(f"hf:{hf_path}")
    assert load_tokenizer(f"hf:{hf_path}").fingerprint == hf.fingerprint
    other = load_tokenizer(f"hf:{train_bpe(tmp_path / 'other.json', vocab_size=500, texts=lee_texts()[:120])}")
    fingerprints = {cl100k.fingerprint, hf.fingerprint, other.fingerprint, load_tokenizer("tiktoken:o200k_base").fingerprint}
    assert len(fingerprints) == 4


def test_hf_tokenizer_ids_bytes_and_round_trip(hf_path):
    from tokenizers import Tokenizer as HF

    raw = HF.from_file(str(hf_path))
    tok = load_tokenizer(f"hf:{hf_path}")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    special = raw.token_to_id("<|endoftext|>")
    assert set(tok.special_ids) == {special}
    assert tok.token_bytes(special) == b"<|endoftext|>"
    assert all(tok.token_bytes(i) for i in range(tok.vocab_size))  # BPE trainer leaves no gaps
    for text in SAMPLES[:5] + lee_texts()[200:203]:
        ids = tok.encode(text)
        assert ids.tolist() == raw.encode(text, add_special_tokens=False).ids
        assert _round_trip(tok, text) == text.encode()
    # byte-level 'Ġthe' is the bytes b" the"
    (the,) = tok.find(" the")
    assert raw.id_to_token(the) == "Ġthe"


@pytest.mark.parametrize("spec", ["cl100k_base", "tiktoken:", "spm:model.model", ":x"])
def test_bad_spec_is_a_clear_error(spec):
    with pytest.raises(TokenizerError, match="spec"):
        load_tokenizer(spec)


def test_unknown_encoding_lists_the_known_ones():
    with pytest.raises(TokenizerError, match=r"'nope'.*cl100k_base"):
        load_tokenizer("tiktoken:nope")


def test_missing_or_invalid_hf_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(f"hf:{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(f"hf:{bad}")


@pytest.mark.parametrize("i", [-1, 100277, 10**9])
def test_out_of_range_id(cl100k, i):
    with pytest.raises(TokenizerError, match=rf"{i}.*out of range.*100277") as info:
        cl100k.token_bytes(i)
    assert isinstance(info.value, VocabMetricError)
