"""Maintained PyPI tokenizer engines beside vocabmetric's fast path: speed and exactness on the same texts.

Each engine loads the same tokenizer.json and encodes the same texts in one process; its ids
are compared, text by text, with the ``tokenizers`` library's
``encode(t, add_special_tokens=False).ids`` on the corpus and on ``EDGE_TEXTS`` (added-token
strings, marks, digits, long repeats). An engine that is not installed is reported as such
(``pip install -e '.[engines]'`` installs them). Used by ``pipeline_throughput.py``.
"""

from __future__ import annotations

import time
import unicodedata
from importlib import metadata
from typing import Callable

import numpy as np

#: Where engines disagree with the library if they do: added tokens, marks, digits, whitespace, long runs.
EDGE_TEXTS = [
    "special <|endoftext|> in<|endoftext|>text<|im_start|>user\n<think>x</think><|eot_id|>",
    "combining e\u0301 a\u0308 <\u0338 x\u0301\u0302 \u0301lead कि مُحَمَّدٌ 1️⃣ 👩🏽‍💻",
    unicodedata.normalize("NFD", "Tiếng Việt, 한국어") + " Ångström \u212b ﬁ",
    "digits 1234567890 3.14159 1,000,000 ١٢٣ ½ Ⅻ 00007 ０１２",
    "spaces    tabs\t\t\tnewlines\n\n\n  \n trailing   \u3000\u00a0",
    "contractions I'm we'll they've 'S 'LL 'ſ K'K don'T",
    "a" * 3000, "ab" * 2000, " " * 2000, "日本" * 1000,
    "".join(np.random.default_rng(0).choice(list("aab"), 10_000)),
]


def _tokie(path: str) -> Callable[[list[str]], list[list[int]]]:
    import tokie

    tok = tokie.Tokenizer.from_json(path)
    return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def _kitoken(path: str) -> Callable[[list[str]], list[list[int]]]:
    import kitoken

    tok = kitoken.Kitoken.from_tokenizers_file(path)
    return lambda texts: tok.encode_all(texts, True)  # added tokens in the text become their ids, as the library does


def _fastokens(path: str) -> Callable[[list[str]], list[np.ndarray]]:
    from fastokens import _native

    tok = _native.Tokenizer.from_file(path)

    def encode(texts: list[str]) -> list[np.ndarray]:
        ids, offsets = tok.encode_batch_flat(texts, add_special_tokens=False)  # no Python int per id
        ids, offsets = np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64).astype(np.int64)
        return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    return encode


ENGINES = {"tokie": _tokie, "kitoken": _kitoken, "fastokens": _fastokens}


def _differing(ours, reference: list[list[int]]) -> int:
    return sum(list(np.asarray(a).tolist()) != b for a, b in zip(ours, reference))


def engine_rows(path: str, texts: list[str], reference: list[list[int]], repeat: int) -> dict:
    """Each installed engine on ``texts``: best wall seconds, CPU seconds, and texts whose ids differ."""
    from tokenizers import Tokenizer

    edge_reference = [e.ids for e in Tokenizer.from_file(path).encode_batch(EDGE_TEXTS, add_special_tokens=False)]
    rows = {}
    for name, make in ENGINES.items():
        try:
            version = metadata.version(name)
            start = time.perf_counter()
            encode = make(path)
            load = time.perf_counter() - start
        except Exception as exc:  # not installed, or cannot read the file: say so
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        best, cpu, ids = float("inf"), 0.0, None
        for _ in range(repeat):  # a fresh engine each run: a word cache must not carry over
            encode = make(path) if ids is not None else encode
            start, c = time.perf_counter(), time.process_time()
            ids = encode(texts)
            best = min(best, time.perf_counter() - start)
            cpu += (time.process_time() - c) / repeat
        rows[name] = {"version": version, "load_seconds": load, "seconds": best, "cpu_seconds": cpu,
                      "tokens": int(sum(len(a) for a in ids)), "texts_differing": _differing(ids, reference),
                      "edge_texts_differing": _differing(encode(EDGE_TEXTS), edge_reference)}
    return rows
