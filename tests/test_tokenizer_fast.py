"""The exact tiktoken fast path for byte-level BPE tokenizer.json files (vocabmetric.vocab.bpe).

Every comparison is against the ``tokenizers`` library itself: ``encode(t, add_special_tokens=False).ids``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import lee_texts, train_bpe
from tokenizers import Tokenizer as HF

from vocabmetric.vocab import tokenizer as vm_tokenizers
from vocabmetric.vocab.bpe import byte_level_alphabet, ranks_to_tokenizer_json
from vocabmetric.building.corpus import iter_documents, tokenize_corpus
from vocabmetric.vocab.tokenizer import batch_encoder, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
#: cl100k's pattern as Llama 3's tokenizer.json writes it: no possessive quantifiers.
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HARD_TEXTS = [
    "日本語のテキストと中文混合、한국어 텍스트。",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷🇯🇵 ✨",
    "naïve café résumé Ångström façade — “quotes” «guillemets» Straße",
    "Ελληνικά русский текст العربية עברית हिन्दी ไทย",
    "spaces    tabs\t\t\tnewlines\n\n\n  \n trailing   ",
    "digits 1234567890 3.14159 1,000,000 ١٢٣ ½ Ⅻ 00007",
    "special <|endoftext|> in<|endoftext|>text<|fim_prefix|><|endofprompt|>",
    "contractions I'm we'll they've 'S 'LL 'ſ K'K don'T",
    "\u00a0nbsp\u2003em\u3000ideographic\u0085nel\u200bzw\u1680ogham\ufeffbom",
    "",
    "combining e\u0301 a\u0308 <\u0338 \u0338<|endoftext|>\u0338",
    "code: def f(x):\n    return x**2  # comment\r\n\tif x != 0: pass",
]

#: Long pieces (one regex match of thousands of bytes) and repeated pairs: where BPE ties are many.
LONG_TEXTS = ["a" * 5000, "ab" * 3000, "=" * 3000, "日本" * 2000, " " * 3000, "\n" * 2000, "é" * 4000, "😀" * 1000,
              "abcabcab" * 700, "".join(np.random.default_rng(0).choice(list("aab"), 20_000))]


def real_texts() -> list[str]:
    docs = [d.text for d in iter_documents(DATA / "python-docs.jsonl.gz")][:40]
    return lee_texts()[:150] + [d[:20_000] for d in docs] + HARD_TEXTS + LONG_TEXTS


def library_ids(path: Path, texts: list[str]) -> list[list[int]]:
    hf = HF.from_file(str(path))
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def warnings_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == vm_tokenizers.LOG.name]


@pytest.fixture(scope="module")
def cl100k_json(tmp_path_factory) -> Path:
    from bpe_openai import registry

    meta = registry.ENCODING_CONSTRUCTORS["cl100k_base"]()
    spec = ranks_to_tokenizer_json(meta["mergeable_ranks"], CL100K_PATTERN, meta["special_tokens"])
    path = tmp_path_factory.mktemp("cl100k") / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_json(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("trained") / "tokenizer.json", vocab_size=3000, texts=lee_texts())


def test_cl100k_as_tokenizer_json_takes_the_fast_path_and_equals_the_library(cl100k_json, caplog):
    texts = real_texts()
    with caplog.at_level(logging.INFO):
        encode = batch_encoder(f"hf:{cl100k_json}")
    assert encode.engine == "tiktoken" and not warnings_from(caplog)
    ours = encode(texts)
    assert all(a.dtype == np.uint32 for a in ours)
    assert [a.tolist() for a in ours] == library_ids(cl100k_json, texts)
    # and the file really is cl100k: ordinary text gets tiktoken:cl100k_base's ids
    plain = [t for t in texts if "<|" not in t]
    assert [a.tolist() for a in encode(plain)] == [a.tolist() for a in load_tokenizer("tiktoken:cl100k_base").encode_batch(plain)]


def test_special_token_strings_in_text_become_their_ids_as_the_library_gives_them(cl100k_json):
    encode = batch_encoder(f"hf:{cl100k_json}")
    endoftext = HF.from_file(str(cl100k_json)).token_to_id("<|endoftext|>")
    ids = encode(["a<|endoftext|>b"])[0].tolist()
    assert endoftext in ids and len(ids) == 3  # split out, as HFTokenizer always did
    assert encode(HARD_TEXTS[6:7])[0].tolist() == library_ids(cl100k_json, HARD_TEXTS[6:7])[0]


def test_a_trained_byte_level_bpe_takes_the_fast_path(trained_json):
    texts = real_texts()
    encode = batch_encoder(f"hf:{trained_json}")
    assert encode.engine == "tiktoken"
    assert [a.tolist() for a in encode(texts)] == library_ids(trained_json, texts)


def write(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


def toy_bpe(merges: list[tuple[str, str]], **model) -> dict:
    """A byte-level BPE: the 256 byte tokens (id = byte), then one token per distinct merge result."""
    vocab = {c: b for b, c in byte_level_alphabet().items()}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [list(m) for m in merges]} | model}


def test_merges_where_tiktoken_semantics_differ_are_refused_once_and_hf_ids_returned(tmp_path, caplog):
    # bc (rank 0) fires before ab, and (a, bc) is no merge: HF leaves "abc" as [a, bc]; tiktoken's
    # lowest-rank-token rule would reach the token "abc" (shown below). Condition (C) catches it.
    spec = toy_bpe([("b", "c"), ("a", "b"), ("ab", "c")])
    path = write(tmp_path / "tokenizer.json", spec)
    with caplog.at_level(logging.WARNING):
        encode = batch_encoder(f"hf:{path}")
        batch_encoder(f"hf:{path}")
        load_tokenizer(f"hf:{path}").encode_batch(["abc"])
    assert encode.engine == "tokenizers"
    (message,) = warnings_from(caplog)
    assert str(path) in message and "do not BPE-encode to themselves" in message and "'abc'" in message
    assert encode(["abc", "xabcabc"])[0].tolist() == [97, 256] == library_ids(path, ["abc"])[0]
    assert [a.tolist() for a in encode(["xabcabc"])] == library_ids(path, ["xabcabc"])

    import tiktoken  # the semantics the check protects against really differ

    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    naive = tiktoken.Encoding("naive", pat_str=r"\s+|\S+", mergeable_ranks=ranks, special_tokens={})
    assert naive.encode_ordinary("abc") == [258]


@pytest.mark.parametrize("change, reason", [
    (lambda s: s["added_tokens"].append({"id": 300, "content": "<x>", "single_word": False, "lstrip": True,
                                         "rstrip": False, "normalized": False, "special": True}),
     "added token '<x>' has lstrip/rstrip/single_word set"),
    (lambda s: s["added_tokens"].extend({"id": 300 + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                                         "normalized": False, "special": True} for i, c in enumerate(["<a|", "|b>"])),
     "added tokens '<a|' and '|b>' overlap"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer is not ByteLevel(add_prefix_space=false)"),
    (lambda s: s["model"]["merges"].append(["a", "bc"]), "several merges produce the same token (e.g. 'abc')"),
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
    (lambda s: s["model"].update(ignore_merges=True) or s["model"]["vocab"].update(zz=999),
     "ignore_merges is on and 1 vocabulary tokens are neither bytes nor merge results"),
])
def test_structurally_refused_files_say_why_and_use_the_library(tmp_path, caplog, change, reason):
    spec = toy_bpe([("a", "b"), ("b", "c"), ("ab", "c")])
    change(spec)
    path = write(tmp_path / "tokenizer.json", spec)
    with caplog.at_level(logging.WARNING):
        encode = batch_encoder(f"hf:{path}")
    (message,) = warnings_from(caplog)
    assert reason in message and str(path) in message
    assert encode.engine == "tokenizers"
    if spec["model"]["dropout"] is None:  # dropout makes the library itself random
        assert [a.tolist() for a in encode(HARD_TEXTS)] == library_ids(path, HARD_TEXTS)


def test_possessive_digit_pattern_is_refused_because_oniguruma_reads_it_differently(cl100k_json, tmp_path, caplog):
    # bpe-openai's cl100k pattern writes \p{N}{1,3}+ (possessive in fancy-regex); Oniguruma reads it as
    # ({1,3})+ and keeps a whole digit run together. The same file through tiktoken would split it.
    from bpe_openai import registry

    possessive = registry.ENCODING_CONSTRUCTORS["cl100k_base"]()["pat_str"]
    spec = json.loads(cl100k_json.read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = possessive
    path = write(tmp_path / "tokenizer.json", spec)
    with caplog.at_level(logging.WARNING):
        encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tokenizers" and r"'\\p{N}{1,3}+'" in warnings_from(caplog)[0]
    library = library_ids(path, ["1234567"])[0]
    assert encode(["1234567"])[0].tolist() == library
    assert library != load_tokenizer("tiktoken:cl100k_base").encode("1234567").tolist()


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("normalizer", [{"type": "NFC"}, {"type": "Sequence", "normalizers": [
    {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Replace", "pattern": {"String": "ß"}, "content": "ss"}]}])
def test_a_normalizer_is_applied_as_the_library_applies_it(trained_json, tmp_path, normalizer):
    # Qwen2's layout: NFC, a Split with its regex (single digits), ByteLevel without regex; added tokens
    # split out of the raw text ("<|endoftext|>") and out of the normalized text ("<tool>", normalized).
    spec = json.loads(trained_json.read_text(encoding="utf-8"))
    spec["normalizer"] = normalizer
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<tool>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    path = write(tmp_path / "tokenizer.json", spec)
    encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tiktoken"
    texts = lee_texts()[:40] + HARD_TEXTS + LONG_TEXTS + ["Cafe\u0301 \u212b \uff21\uff22 ﬁ Straße <TOOL> <tool><|endoftext|>A\u0301<|endoftext|>",
                            "<|ENDOFTEXT|> <Tool>x", "2024年 ①②"]
    assert [a.tolist() for a in encode(texts)] == library_ids(path, texts)


def test_switched_off_by_the_environment(trained_json, monkeypatch):
    monkeypatch.setenv("VOCABMETRIC_BPE_FAST", "0")
    encode = batch_encoder(f"hf:{trained_json}")
    assert encode.engine == "tokenizers"
    assert [a.tolist() for a in encode(HARD_TEXTS)] == library_ids(trained_json, HARD_TEXTS)


def test_a_file_with_truncation_is_still_counted_whole(trained_json, tmp_path):
    spec = json.loads(trained_json.read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    path = write(tmp_path / "tokenizer.json", spec)
    text = lee_texts()[0]
    full = library_ids(trained_json, [text])[0]
    assert len(full) > 4
    assert load_tokenizer(f"hf:{path}").encode(text).tolist() == full
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Strip", "strip_left": False, "strip_right": False}]}
    refused = write(tmp_path / "refused.json", spec)  # the library path, with the truncation lifted
    assert load_tokenizer(f"hf:{refused}").encode(text).tolist() == full


def test_corpus_workers_use_the_fast_path_and_count_the_library_ids(trained_json, tmp_path):
    source = DATA / "lee_background.txt.gz"
    stats = tokenize_corpus(f"hf:{trained_json}", [source], tmp_path / "out", workers=2, progress=False)
    texts = [d.text for d in iter_documents(source)]
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in library_ids(trained_json, texts)])
    expected = np.bincount(ids, minlength=stats.counts.size)
    np.testing.assert_array_equal(stats.counts, expected)
    lines = (tmp_path / "out" / "corpus.txt").read_text().split()
    assert len(lines) == stats.n_tokens == ids.size


def test_in_memory_tokenizer_gets_the_same_ids(trained_json):
    wrapped = vm_tokenizers.HFTokenizer.from_hf(HF.from_file(str(trained_json)))
    assert [a.tolist() for a in wrapped.encode_batch(HARD_TEXTS)] == library_ids(trained_json, HARD_TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cl100k_json", "trained_json"])
def test_every_code_point_in_letter_digit_space_and_quote_context(which, request):
    # The regex half of the equivalence rests on Oniguruma and fancy-regex classing every character
    # alike (\s, \p{L}, \p{N}, case folding in (?i:'s...)): checked here on all of Unicode.
    path = request.getfixturevalue(which)
    code_points = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = ["".join(f"x{chr(c)}y 1{chr(c)}2 {chr(c)}{chr(c)} '{chr(c)}\n{chr(c)}\u00a0" for c in code_points[i:i + 256])
             for i in range(0, len(code_points), 256)]
    encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tiktoken"
    hf = HF.from_file(str(path))
    library = hf.encode_batch_fast(texts, add_special_tokens=False)
    wrong = [hex(code_points[256 * i]) for i, (a, e) in enumerate(zip(encode(texts), library)) if a.tolist() != e.ids]
    assert not wrong, f"texts starting at these code points differ: {wrong[:10]}"


def test_bytes_the_vocabulary_lacks_send_only_their_texts_to_the_library(trained_json, tmp_path, caplog):
    # SmolLM2's tokenizer.json lacks 21 byte-level characters (control bytes, bytes UTF-8 never has). The
    # library drops such a character and may merge across it ("the\x04re" is "there"); tiktoken cannot
    # encode it. A text with such a byte goes to the library, every other text stays on the fast path.
    spec = json.loads(trained_json.read_text(encoding="utf-8"))
    alphabet = byte_level_alphabet()
    for b in (0x04, 0x80, 0xC0, 0xF1):  # a control byte, a continuation byte, bytes no UTF-8 text has
        del spec["model"]["vocab"][alphabet[b]]
    assert not any(alphabet[b] in "".join(m) for m in spec["model"]["merges"] for b in (0x04, 0x80, 0xC0, 0xF1))
    path = write(tmp_path / "tokenizer.json", spec)
    with caplog.at_level(logging.WARNING):
        encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tiktoken" and not warnings_from(caplog)
    lacking = ["the\x04re", "a\U00044444b", "\u0400 Ѐ", "x<|endoftext|>\x04"]  # U+0400 is d0 80: the continuation byte
    texts = lacking + HARD_TEXTS + real_texts()[:60]
    assert [a.tolist() for a in encode(texts)] == library_ids(path, texts)
    assert library_ids(path, ["the\x04re"]) == library_ids(path, ["there"])
