"""The exact fast path on the tokenizer.json layouts open models ship: Llama 3, Qwen2/2.5/3, Qwen3.5/3.6.

Each file is written offline from a tiktoken rank file (``vocabmetric.vocab.bpe_layouts``) in the
model family's own layout (split regex, NFC or none, ignore_merges, added tokens after the
vocabulary), and every id is compared with the ``tokenizers`` library's
``encode(t, add_special_tokens=False).ids`` on multilingual text.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import pytest
from test_tokenizer_fast import HARD_TEXTS, LONG_TEXTS, library_ids, real_texts, warnings_from, write
from tokenizers import Tokenizer as HF

from vocabmetric.vocab.bpe_layouts import PATTERNS, tokenizer_json
from vocabmetric.vocab.tokenizer import batch_encoder

#: Scripts with combining marks (Mn, Mc, Me), digits of several scripts, emoji sequences, code, whitespace runs.
MULTILINGUAL = [
    "مُحَمَّدٌ رَسُولُ اللَّهِ والعربيةُ بلا تشكيل ١٢٣٤٥ ٦٧٨٩٠",
    "שָׁלוֹם עוֹלָם — עברית עם ניקוד",
    "हिन्दी किताब पढ़ो। क्षत्रिय ज्ञान ११२३ தமிழ் மொழி ಕನ್ನಡ",
    "ภาษาไทย ๑๒๓ ສະບາຍດີ မြန်မာစာ ខ្មែរ",
    unicodedata.normalize("NFD", "Tiếng Việt có dấu: người, được, nhưng"),
    unicodedata.normalize("NFD", "한국어 자모 분해: 가나다라 훈민정음"),
    "中文：你好，世界！繁體字與简体字。日本語の「かな」と漢字、ｶﾀｶﾅ。",
    "emoji ❤️ 👩🏽‍💻 🏳️‍🌈 1️⃣ #️⃣ 🇺🇳 a\u20dd x\u0301\u0302\u0303 \u0301lead q\u0307\u0323",
    "digits 0123456789 ０１２３ ²³ ½ Ⅻ ⅷ 𝟙𝟚 3.14 1e-9 0x1F 1_000_000",
    "code:\n\tfor (int i = 0; i < n; ++i) {\r\n\t\tsum += a[i] * b[i];\n\t}\n\n\n    return sum;  // done",
    "whitespace   runs\u3000\u3000ideographic \t \t mixed\n \n\n\r\n\r\n   \n",
    "Zalgo: Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324a\u0352\u0352l\u0344g\u0308o\u0358",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n4\n</think><tool_call>{}</tool_call>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "'S 'LL 'ſ I'M we'RE ’s x'\u0301s",
]


def layout_file(tmp_path_factory, layout: str, encoding: str) -> Path:
    from bpe_openai import registry

    spec = tokenizer_json(registry.ENCODING_CONSTRUCTORS[encoding]()["mergeable_ranks"], layout)
    return write(tmp_path_factory.mktemp(layout) / "tokenizer.json", spec)


@pytest.fixture(scope="module")
def llama3_json(tmp_path_factory) -> Path:
    return layout_file(tmp_path_factory, "llama3", "cl100k_base")


@pytest.fixture(scope="module")
def qwen2_json(tmp_path_factory) -> Path:
    return layout_file(tmp_path_factory, "qwen2", "cl100k_base")


@pytest.fixture(scope="module")
def qwen35_json(tmp_path_factory) -> Path:
    return layout_file(tmp_path_factory, "qwen3.5", "o200k_base")  # 200k ids, a Qwen-class vocabulary


@pytest.mark.parametrize("fixture", ["llama3_json", "qwen2_json", "qwen35_json"])
def test_each_layout_takes_the_fast_path_with_the_library_ids(fixture, request, caplog):
    path = request.getfixturevalue(fixture)
    with caplog.at_level(logging.INFO):
        encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tiktoken" and not warnings_from(caplog)
    texts = MULTILINGUAL + HARD_TEXTS + LONG_TEXTS + real_texts()[150:170]
    assert [a.tolist() for a in encode(texts)] == library_ids(path, texts)


def test_the_layouts_are_the_families_own(llama3_json, qwen35_json):
    llama, qwen = (json.loads(p.read_text(encoding="utf-8")) for p in (llama3_json, qwen35_json))
    assert llama["normalizer"] is None and llama["model"]["ignore_merges"] is True
    assert qwen["normalizer"] == {"type": "NFC"} and not qwen["model"]["ignore_merges"]
    split, byte_level = qwen["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == PATTERNS["qwen3.5"] and byte_level["use_regex"] is False
    hf = HF.from_file(str(qwen35_json))
    # added tokens sit right after the vocabulary, and the library gives them those ids
    assert hf.token_to_id("<|endoftext|>") == len(qwen["model"]["vocab"]) == 199_998
    assert hf.encode("<|im_end|>", add_special_tokens=False).ids == [hf.token_to_id("<|im_end|>")]
    # Llama 3's post-processor adds <|begin_of_text|> only when asked: not in the corpus count
    hf = HF.from_file(str(llama3_json))
    assert hf.encode("hi").ids[0] == hf.token_to_id("<|begin_of_text|>")
    assert batch_encoder(f"hf:{llama3_json}")(["hi"])[0].tolist() == hf.encode("hi", add_special_tokens=False).ids


def test_qwen35_keeps_marks_with_their_letters_where_qwen2_splits_them(qwen35_json, tmp_path):
    # The two regexes really give other ids on scripts with marks NFC cannot compose away (o200k's
    # ranks have the tokens that show it), and the fast path follows each.
    texts = ["हिन्दी किताब", "مُحَمَّدٌ", "x\u0301y q\u0307\u0323 1️⃣", "\u0301\u0302 lead"]
    spec = json.loads(qwen35_json.read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = PATTERNS["qwen2"]
    qwen2_split = write(tmp_path / "tokenizer.json", spec)  # Qwen2's regex on the same file: only the split differs
    for path in (qwen35_json, qwen2_split):
        encode = batch_encoder(f"hf:{path}")
        assert encode.engine == "tiktoken"
        assert [a.tolist() for a in encode(texts)] == library_ids(path, texts)
    assert library_ids(qwen35_json, texts[:2]) != library_ids(qwen2_split, texts[:2])


def test_a_regex_that_leaves_marks_unmatched_is_refused(qwen2_json, tmp_path, caplog):
    # Qwen3.5's symbol alternative (no \p{M}) with Qwen2's letter one (no \p{M}): a mark not before a
    # letter matches nothing. tiktoken would drop it, the library keeps it: the check must refuse.
    spec = json.loads(qwen2_json.read_text(encoding="utf-8"))
    pattern = PATTERNS["qwen3.5"].replace(r"[\p{L}\p{M}]+", r"\p{L}+")
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    path = write(tmp_path / "tokenizer.json", spec)
    with caplog.at_level(logging.WARNING):
        encode = batch_encoder(f"hf:{path}")
    assert encode.engine == "tokenizers" and "may leave characters unmatched" in warnings_from(caplog)[0]
    text = ["\u0301x \u20dd"]
    assert encode(text)[0].tolist() == library_ids(path, text)[0]
    import tiktoken

    dropped = tiktoken.Encoding("t", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    assert dropped.encode_ordinary("x\u0301") == [ord("x")]  # the mark's two bytes are lost


@pytest.mark.slow
def test_every_code_point_next_to_letters_marks_digits_and_spaces(qwen35_json):
    # \p{M} joins \p{L}, \p{N}, \s in the classes Oniguruma and fancy-regex must agree on: all of Unicode,
    # each code point after and before a letter, a mark, a digit, a space and itself, and NFC'd as the library does.
    code_points = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = ["".join(f"x{chr(c)}y \u0301{chr(c)}\u0301 1{chr(c)}2 {chr(c)}{chr(c)} '{chr(c)}\n{chr(c)}\u00a0"
                     for c in code_points[i:i + 256]) for i in range(0, len(code_points), 256)]
    encode = batch_encoder(f"hf:{qwen35_json}")
    assert encode.engine == "tiktoken"
    library = HF.from_file(str(qwen35_json)).encode_batch_fast(texts, add_special_tokens=False)
    wrong = [hex(code_points[256 * i]) for i, (a, e) in enumerate(zip(encode(texts), library)) if a.tolist() != e.ids]
    assert not wrong, f"texts starting at these code points differ: {wrong[:10]}"
