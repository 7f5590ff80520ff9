"""The tokenizer a GGUF file carries (``gguf:<file>`` specs), built from its metadata.

:func:`gguf_tokenizer_json` makes the ``tokenizers`` JSON of the file's own tokenizer from
``tokenizer.ggml.*`` without ``transformers`` for byte-level BPE files
(``tokenizer.ggml.model = "gpt2"``: GPT-2, Llama 3, Qwen, SmolLM …), exactly as
``transformers``' GGUF conversion (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``)
builds it: the vocabulary spelled in GPT-2's byte alphabet, the file's merges, CONTROL tokens
as special added tokens and USER_DEFINED ones as plain added tokens, and the pre-tokenizer
split that ``tokenizer.ggml.pre`` names (GPT-2's byte-level regex for a name not in
:data:`PRE_SPLITS`); tests/test_gguf.py compares the ids. Other tokenizer models
(sentencepiece ``llama``, ``t5``) go through ``transformers``' conversion when it is installed.

(llama.cpp's own tokenizer can differ from ``transformers``' on a few texts: for
``pre = "smollm"`` it splits digits off first, so two spaces before a number are one token
there and two here; we follow ``transformers``, the library a training run uses.)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TokenizerError
from .._util.gguf import read_header

#: ``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``).
CONTROL, USER_DEFINED = 3, 4

#: ``tokenizer.ggml.pre`` → the split regex of the pre-tokenizer (as transformers' GGUF
#: conversion maps them); a name not here keeps GPT-2's byte-level regex.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


def read_tokenizer_fields(path: Path) -> dict:
    """``tokenizer.ggml.*`` and ``general.architecture`` of a GGUF, as plain Python values."""
    out = read_header(path, keep=lambda key: key.startswith("tokenizer.ggml.") or key == "general.architecture").metadata
    if "tokenizer.ggml.tokens" not in out:
        raise TokenizerError(f"{path} has no tokenizer (no tokenizer.ggml.tokens in its metadata); "
                             "give the model's tokenizer another way (tokenizer.spec = 'hf:<tokenizer.json>')")
    return out


def gguf_tokenizer_json(path: Path) -> str:
    """The ``tokenizers`` JSON of the GGUF's own tokenizer (see the module docstring)."""
    fields = read_tokenizer_fields(path)
    model = fields.get("tokenizer.ggml.model")
    if model == "gpt2":
        return json.dumps(byte_level_bpe(fields))
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:
        raise TokenizerError(f"{path}: tokenizer model {model!r} is built here only through transformers' GGUF "
                             "conversion, and transformers is not installed: pip install transformers "
                             "(byte-level 'gpt2' tokenizers need no transformers)") from None
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as exc:
        raise TokenizerError(f"{path}: {exc}") from None
    return backend.to_str()


def byte_level_bpe(fields: dict) -> dict:
    """A byte-level BPE ``tokenizer.json`` (a dict) from ``tokenizer.ggml.*`` fields.

    Tokens are spelled in GPT-2's byte alphabet (a token with another character is
    respelled byte by byte from its UTF-8); tokens typed CONTROL (3) whose spelling is in the
    alphabet become special added tokens, USER_DEFINED (4) ones plain added tokens.
    """
    from .bpe import byte_level_alphabet

    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or ())
    # a spelling that occurs twice keeps its last id (transformers' conversion does the same)
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
             for i, token in enumerate(tokens)}
    merges = [m.split(" ", 1) for m in fields.get("tokenizer.ggml.merges") or ()]
    added = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if (kind == CONTROL and set(token) <= alphabet) or (kind == USER_DEFINED and token in vocab):
            added.append({"id": vocab.get(token, i), "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": kind == CONTROL})
    split = PRE_SPLITS.get(fields.get("tokenizer.ggml.pre"))
    if split is None:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
