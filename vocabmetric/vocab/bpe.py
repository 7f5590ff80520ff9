"""An exact tiktoken engine for plain byte-level BPE ``tokenizer.json`` files.

The ``tokenizers`` library spends most of its time in its regex pre-tokenizer (Oniguruma);
tiktoken does the same splitting and merging several times faster. :func:`exact_engine`
turns a tokenizer.json's merges into tiktoken ranks, and returns an encoder whose ids equal
``Tokenizer.encode(text, add_special_tokens=False).ids`` for every text — or ``None`` with
the reason, when the file is not of a kind proven equivalent below. The check reads the
file's structure and every merge; it does not sample texts.

**The two algorithms.** A word is a sequence of byte tokens.
HF's BPE (``models/bpe/word.rs``) repeatedly merges the adjacent pair ``(x, y)`` that is in
the merge list ``M`` with the lowest merge index, ties to the leftmost position (its heap
orders by ``(rank, pos)``; a stale entry cannot fire with the wrong rank, because a token
id fixes its string and a position's pair only ever grows). With ``ignore_merges`` a word
that is a vocabulary token is returned whole first.
tiktoken (``_byte_pair_merge``) repeatedly merges the adjacent pair whose concatenation has
the lowest rank ``R`` among tokens in its table, ties to the leftmost (``rank < min``);
a piece that is itself in the table is returned whole first.

**The ranks.** Merge ``k`` is ``(a_k, b_k) → t_k``. The table holds the 256 byte tokens and
the results ``t_k``, with ``R(t_k)`` increasing in ``k`` (the HF ids themselves when they
already increase with ``k``, else ``256 + k`` and a lookup table back to the ids).

**The conditions** (each checked on the file; any failure refuses, naming it):

* (A) every byte of a text the engine encodes has its byte-level character in the
  vocabulary (so no unknown/byte-fallback path is ever taken; ``unk_token``/``byte_fallback``
  are then inert), no dropout, no ``continuing_subword_prefix``/``end_of_word_suffix``. A
  file may lack up to 32 of the 256 (SmolLM2's lacks 21: control bytes, bytes no UTF-8 text
  has): a text whose UTF-8 (after the normalizer) holds one of those bytes is encoded by the
  library instead, whole — the library drops such a character and may merge across it;
* (B) the results ``t_k`` are distinct: one merge per token;
* (C) every ``t_k`` BPE-encodes, by HF's own model with ``ignore_merges`` off, to ``[t_k]``;
* (D) with ``ignore_merges`` on, every vocabulary token over the byte alphabet is a byte
  or some ``t_k`` (otherwise HF could return a whole word tiktoken has no rank for).

**Lemma.** Under (C), in any state HF's BPE reaches on any word, an adjacent pair
``(x, y)`` with ``x + y = t`` in the table is in ``M``. *Proof.* ``x`` and ``y`` were built
by merges inside the span of ``t`` only (symbols never split). Run HF on ``t`` alone: the
pairs inside the span, and their ranks and order, are the same as in the full word, and
each merge the full run made inside the span was the minimum over all its candidates, so
also over those inside the span. So the lone run makes the same merges and reaches
``[x, y]``; if ``(x, y) ∉ M`` it stops there, contradicting (C). ∎

**Theorem.** Under (A)–(D) both algorithms make the same merge at every step. By induction
on the steps, both are in the same state. HF's candidates are the adjacent pairs in ``M``;
each concatenates to a ``t_k``, so it is a tiktoken candidate. A tiktoken candidate
concatenates to a table token of length ≥ 2, some ``t_k``, and by the lemma is in ``M``,
by (B) it is exactly ``(a_k, b_k)``. So the candidates agree, and keys ``k`` (HF) and
``R(t_k)`` (tiktoken) are ordered alike; equal keys mean the same pair, and both break ties
leftmost. The whole-word shortcuts agree: by (C) HF without it returns ``[t]`` for a table
token anyway; by (D) with it HF returns nothing outside the table. ∎

**Around the model.** Normalizer: any. The library's ``encode`` splits out the added tokens
not marked ``normalized`` on the raw text, normalizes each remaining piece on its own, then
splits out the ``normalized`` ones; the engine does the same, calling the file's own
normalizer (``normalize_str``) on the same pieces, so the text that reaches the regex is the
same string (an empty piece must stay empty: it is skipped). An NFC normalizer alone (Qwen's) is
not called on a piece whose code points are all below U+0300: those have combining class 0,
are their own NFC and are no composition's second element, so NFC returns the piece as is.
Pre-tokenizer: ``ByteLevel(add_prefix_space=false, use_regex=true)`` (GPT-2's pattern), or
``Sequence[Split(Regex P, Isolated, invert=false), ByteLevel(add_prefix_space=false,
use_regex=false)]``. tiktoken BPE-encodes only the regex *matches* and HF also keeps the
text between them, so P must match at every position. What is checked on P:

1. its top-level alternatives (split at ``|`` outside groups and classes) are each, as
   strings, one of ``_ALTERNATIVES``: the alternatives of GPT-2's, cl100k's as Llama 3's
   file writes it (``\\p{N}{1,3}``), Qwen2/2.5/3's (single ``\\p{N}``), o200k's, and
   Qwen3.5/3.6's (``[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+`` words,
   ``[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*`` symbols after an optional space). None matches the empty string, and each
   means the same in Oniguruma and fancy-regex: Unicode classes, ``?``/``*``/``+``/``{m,n}``,
   ``(?i:...)``, ``(?!\\S)``, no possessive quantifiers (Oniguruma reads ``{1,3}+`` as
   "``{1,3}``, one or more times"; that form is refused);
2. every character starts a match: each alternative lists the classes a match can start on
   (``\\s``, ``\\p{L}``, ``\\p{N}``, ``\\p{M}``, everything else — a partition of all code
   points), and together the alternatives must cover all five. ``\\p{M}`` is its own class
   because Qwen3.5's symbol alternative excludes marks: there, only the word alternative
   starts on a mark; a regex with neither leaves a mark not before a letter unmatched.

The regex equivalence rests on the two engines agreeing on these constructs and on their
Unicode tables (a character classed differently by two Unicode versions would split
differently; ``tests/test_tokenizer_fast.py`` and ``tests/test_tokenizer_layouts.py``
compare every code point beside letters, marks, digits and spaces, marked slow); the
rest is the proof above. Added tokens are split out before the regex by
both: they must have no ``lstrip``/``rstrip``/``single_word``, and no added token may
overlap another (none a substring of another, no suffix of one a prefix of another), so
that HF's leftmost-longest two-pass matching and tiktoken's alternation find the same
occurrences. Post-processors add nothing at ``add_special_tokens=False``.

Cost: the check is one HF BPE call per merge (about 1 s at 100k merges); building the
tiktoken table about 0.2 s.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

#: The byte-level alternatives of the known patterns (GPT-2; cl100k and Llama 3; o200k; Qwen2/2.5's single
#: digits; Qwen3.5's letter-or-mark words), each with the character classes a match can start on: ``S`` (``\s``),
#: ``L`` (``\p{L}``), ``N`` (``\p{N}``), ``M`` (``\p{M}``), ``X`` (anything else); ``""``: only specific strings;
#: ``l``/``u``: o200k's lower-/upper-case-led words, which start on every letter only together.
_ALTERNATIVES: dict[str, str] = {
    **{f"'{s}": "" for s in ("s", "t", "re", "ve", "m", "ll", "d")},
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)": "",
    r" ?\p{L}+": "L", r"[^\r\n\p{L}\p{N}]?\p{L}+": "L", r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+": "LM",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?": "lM",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?": "uM",
    r" ?\p{N}+": "N", r"\p{N}{1,3}": "N", r"\p{N}": "N", r"\p{N}+": "N",
    r" ?[^\s\p{L}\p{N}]+": "MX", r" ?[^\s\p{L}\p{N}]+[\r\n]*": "MX", r" ?[^\s\p{L}\p{N}]+[\r\n/]*": "MX",
    r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*": "X",
    r"\s*[\r\n]+": "", r"\s+(?!\S)": "", r"\s+": "S", r"\s": "S",
}
#: HF's ByteLevel(use_regex=true) pattern (pre_tokenizers/byte_level.rs).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table (the characters byte-level vocabularies use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    shifted = 0
    for b in range(256):
        if b not in bs:  # the unprintable bytes: 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def exact_engine(spec: dict, hf: Any, source: str, library: Callable[[Sequence[str]], list[np.ndarray]]
                 ) -> tuple[Callable[[Sequence[str]], list[np.ndarray]] | None, str]:
    """``(encoder, "")`` when the tokenizer.json ``spec`` passes the check, else ``(None, reason)``.

    ``hf``: the same file loaded by ``tokenizers``: its added tokens' real ids (which need not
    be the file's) and its normalizer, which the engine calls as the library's ``encode`` does.
    ``library``: the library's own encoder, for the texts with a byte whose byte-level character
    the vocabulary lacks (condition (A)).
    """
    added = hf.get_added_tokens_decoder()
    reason = _structure_refusal(spec, added)
    if reason:
        return None, reason
    pattern, _ = _pattern(spec["pre_tokenizer"])
    ranks, ids, reason, missing = _ranks(spec["model"])
    if reason:
        return None, reason
    normalizer = hf.normalizer if spec.get("normalizer") else None
    if normalizer is not None and normalizer.normalize_str("") != "":
        return None, "its normalizer turns an empty text into a non-empty one"
    # With a normalizer, added tokens not marked `normalized` are split out of the raw text first,
    # then each piece is normalized, then the `normalized` ones are split out (HF's order).
    raw = {t.content: int(i) for i, t in added.items() if normalizer is not None and not t.normalized}
    specials = {t.content: int(i) for i, t in added.items() if t.content not in raw}
    try:
        import tiktoken
    except ImportError:
        return None, "the tiktoken package is not installed (`pip install tiktoken`)"
    start = len(ids)  # specials get ranks past the table (their own ids where those are free)
    special_ranks = dict(specials) if all(i >= start for i in specials.values()) else {
        s: start + j for j, s in enumerate(specials)}
    lut = np.zeros(max([start - 1, *special_ranks.values()]) + 1, dtype=np.uint32)
    lut[:start] = ids
    for s, rank in special_ranks.items():
        lut[rank] = specials[s]
    identity = bool(np.array_equal(lut[[*range(start), *special_ranks.values()]],
                                   np.array([*range(start), *special_ranks.values()])))
    engine = tiktoken.Encoding(f"vocabmetric:{source}", pat_str=pattern, mergeable_ranks=ranks,
                               special_tokens=special_ranks)
    allowed = engine.special_tokens_set

    lacks = re.compile(b"[" + re.escape(missing) + b"]").search if missing else None

    def encode_piece(text: str) -> np.ndarray | None:
        """tiktoken's ids, or None when a byte of the text has no byte-level token (the library's case)."""
        if lacks is not None and lacks(text.encode("utf-8", "surrogatepass")):
            return None
        ids = engine.encode_to_numpy(text, allowed_special=allowed)  # no Python int per id
        return ids if identity else lut[ids]

    encode_text = encode_piece
    if normalizer is not None:
        split = re.compile("(" + "|".join(map(re.escape, raw)) + ")") if raw else None
        normalize = normalizer.normalize_str
        if _is_nfc(spec["normalizer"]):  # NFC leaves a text of code points below U+0300 as it is: skip the call
            below_0300 = re.compile("[\x00-\u02ff]*").fullmatch
            normalize = lambda p: p if below_0300(p) else normalizer.normalize_str(p)  # noqa: E731

        def encode_text(text: str) -> np.ndarray | None:
            pieces = split.split(text) if split else [text]  # text, token, text, ...: a token at odd places
            ids = [np.array([raw[p]], dtype=np.uint32) if k % 2 else encode_piece(normalize(p))
                   for k, p in enumerate(pieces) if p]
            if any(a is None for a in ids):
                return None
            return np.concatenate(ids) if ids else np.zeros(0, np.uint32)

    def encode_batch(texts: Sequence[str]) -> list[np.ndarray]:
        arrays = [encode_text(t) for t in texts]
        routed = [i for i, a in enumerate(arrays) if a is None]
        for i, a in zip(routed, library([texts[i] for i in routed]) if routed else ()):
            arrays[i] = a
        return arrays

    encode_batch.engine = "tiktoken"  # type: ignore[attr-defined]  (which path a caller got)
    return encode_batch, ""


def _is_nfc(normalizer: dict) -> bool:
    """Whether a tokenizer.json normalizer is NFC alone (Qwen's). Every code point below U+0300
    has canonical combining class 0, is its own NFC, and is no composition's second element
    (those start at U+0300), so NFC maps a text of them to itself, in every Unicode version."""
    steps = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
    return len(steps or ()) == 1 and steps[0].get("type") == "NFC"


def _structure_refusal(spec: dict, added: dict[int, Any]) -> str:
    """Why the normalizer, pre-tokenizer, model flags or added tokens are not of the proven kind."""
    pattern, reason = _pattern(spec.get("pre_tokenizer") or {})
    if pattern is None:
        return reason
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"its BPE model sets {key}={model[key]!r}"
    for t in added.values():
        if not t.content or t.lstrip or t.rstrip or t.single_word:
            return f"added token {t.content!r} has lstrip/rstrip/single_word set (or is empty)"
    contents = sorted({t.content for t in added.values()})
    starts: dict[str, set[str]] = {}  # proper prefix -> the added tokens that start with it
    for b in contents:
        for i in range(1, len(b)):
            starts.setdefault(b[:i], set()).add(b)
    for a in contents:
        inside = next((b for b in contents if a != b and a in b), None)
        after = next((b for i in range(1, len(a)) for b in starts.get(a[i:], ()) if b != a), None)
        if inside or after:
            return f"added tokens {a!r} and {inside or after!r} overlap, so the order of matching them matters"
    return ""


def _pattern(pre: dict) -> tuple[str | None, str]:
    """The regex tiktoken must split with, or ``(None, why)`` if the pre-tokenizer is not of the proven kind."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    plain = (f"its pre-tokenizer is not ByteLevel(add_prefix_space=false) alone or after one Split "
             f"(it is {json.dumps(pre, ensure_ascii=False)[:300]})")
    if not steps or any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        return None, plain
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return GPT2_PATTERN, ""
    if len(steps) != 2:
        return None, plain
    split, byte_level = steps
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or split.get("type") != "Split":
        return None, plain
    pattern = (split.get("pattern") or {}).get("Regex")
    if pattern is None or split.get("behavior") != "Isolated" or split.get("invert"):
        return None, plain
    alternatives = _top_level_alternatives(pattern)
    unknown = [a for a in alternatives if a not in _ALTERNATIVES]
    if unknown:
        return None, (f"its split regex has alternatives the fast path does not know ({', '.join(map(repr, unknown))}): "
                      "Oniguruma and tiktoken's fancy-regex must read each alike, and together they must match at "
                      "every character")
    starts = set("".join(_ALTERNATIVES[a] for a in alternatives))
    if {"l", "u"} <= starts:  # o200k's two letter alternatives: lower-case-led and upper-case-led
        starts.add("L")
    if not {"S", "L", "N", "M", "X"} <= starts:
        return None, "its split regex may leave characters unmatched: tiktoken drops them, HF keeps them"
    return pattern, ""


def _top_level_alternatives(pattern: str) -> list[str]:
    """``pattern`` split at the ``|`` outside groups and classes."""
    parts, depth, in_class, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(pattern):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    return parts + [pattern[start:]]


def merge_pairs(model: dict) -> list[tuple[str, ...]]:
    """A BPE model's merges (a tokenizer.json's ``model``) as token-string tuples, in priority
    order: ``"a b"`` (the older form) and ``["a", "b"]`` alike. A well-formed merge is a pair;
    the callers decide what to do with one that is not."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or ()]


def _ranks(model: dict) -> tuple[dict[bytes, int], np.ndarray, str, bytes]:
    """tiktoken's table (bytes → rank), the HF id of each rank, why not if conditions (A)–(D) fail,
    and the bytes whose byte-level character the vocabulary lacks (texts with them go to the library)."""
    vocab: dict[str, int] = model["vocab"]
    alphabet = byte_level_alphabet()
    to_latin1 = str.maketrans({c: chr(b) for b, c in alphabet.items()})
    outside = re.compile("[^" + re.escape("".join(alphabet.values())) + "]")
    missing = bytes(b for b, c in alphabet.items() if c not in vocab)
    if len(missing) > 32:  # a few (SmolLM2 lacks 21, mostly bytes UTF-8 never has) are routed; many mean another model
        return {}, np.zeros(0), f"{len(missing)} of the 256 byte-level characters are not in its vocabulary", missing
    merges = merge_pairs(model)
    if any(len(m) != 2 for m in merges):
        return {}, np.zeros(0), "a merge is not a pair of tokens", missing
    results = [a + b for a, b in merges]
    if len(set(results)) != len(results):
        seen: set[str] = set()
        dup = next(t for t in results if t in seen or seen.add(t))
        return {}, np.zeros(0), (f"several merges produce the same token (e.g. {dup!r}): HF ranks the pairs, "
                                 "tiktoken the token"), missing
    if outside.search("".join(results)):
        return {}, np.zeros(0), "a merge produces a token outside the byte-level alphabet", missing
    if model.get("ignore_merges"):
        table = set(results) | set(alphabet.values())
        extra = [t for t in vocab if t not in table and not outside.search(t)]
        if extra:
            return {}, np.zeros(0), (f"ignore_merges is on and {len(extra)} vocabulary tokens are neither bytes nor "
                                     f"merge results (e.g. {extra[0]!r}): HF returns them for a whole word, tiktoken cannot"), missing
    broken = _not_self_encoding(vocab, merges, results)
    if broken:
        return {}, np.zeros(0), (f"{len(broken)} merged tokens do not BPE-encode to themselves (e.g. {broken[0]!r}), "
                                 "so tiktoken's lowest-rank-token rule would merge pairs HF never merges"), missing
    byte_ids = {b: vocab[alphabet[b]] for b in range(256) if b not in missing}  # a missing byte gets no rank
    result_ids = np.array([vocab[t] for t in results], dtype=np.int64)
    token_bytes = [t.translate(to_latin1).encode("latin-1") for t in results]
    if bool(np.all(np.diff(result_ids) > 0)):  # the ids order the merges: they can be the ranks themselves
        ranks = {bytes([b]): i for b, i in byte_ids.items()}  # byte ranks are never compared: any distinct ids do
        ranks.update(zip(token_bytes, result_ids.tolist()))
        return ranks, np.arange(max([*byte_ids.values(), *result_ids[-1:].tolist()]) + 1, dtype=np.uint32), "", missing
    ranks = {bytes([b]): b for b in byte_ids}
    ranks.update(zip(token_bytes, range(256, 256 + len(token_bytes))))
    return ranks, np.array([byte_ids.get(b, 0) for b in range(256)] + result_ids.tolist(), dtype=np.uint32), "", missing


def _not_self_encoding(vocab: dict[str, int], merges: list[tuple[str, str]], results: list[str]) -> list[str]:
    """Condition (C), by HF's own BPE model (ignore_merges off, no cache): the results t_k whose
    encoding is not ``[t_k]``."""
    from tokenizers.models import BPE

    model = BPE(vocab=vocab, merges=merges, ignore_merges=False, cache_capacity=0)
    return [t for t in results if len(model.tokenize(t)) != 1]


def ranks_to_tokenizer_json(mergeable_ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int]) -> dict:
    """A tiktoken encoding written as a tokenizer.json (BPE, Split + ByteLevel), ids = ranks.

    Each token's merge is the split that tiktoken's own BPE, restricted to lower ranks,
    ends with (as minbpe's ``recover_merges``). ``pat_str`` is used as is: give a form
    Oniguruma reads alike (cl100k's without possessive quantifiers). Cost: O(Σ len²) Python.
    """
    alphabet = byte_level_alphabet()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [mergeable_ranks.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not reachable by lower-ranked merges")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append([text(parts[0]), text(parts[1])])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {text(b): r for b, r in mergeable_ranks.items()}, "merges": merges},
    }
