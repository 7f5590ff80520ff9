"""The teacher's top-k as a vocabmetric reference: padding rows, padded-head ids, int64.

verl hands the reference as ``(ids [..., k] int32, logprobs [..., k])`` per position, the
log-probabilities of the k most likely tokens (their mass is below one; vocabmetric
spreads the rest evenly over the other tokens, :func:`~vocabmetric.regularizers.reference_probs`).
Two kinds of rows are not such a distribution and are handled here, not in the penalty:

* padding rows (verl fills them with one id repeated and log-probabilities 0, so the ids
  repeat and the "probabilities" sum to k > 1) are *invalid*: the penalty is not computed
  there, its value is 0 and its gradient exactly 0;
* ids at or past the metric's vocabulary ``V`` (a model whose LM head is padded past its
  tokenizer, e.g. Qwen's) carry mass the metric cannot place: that mass joins the rest mass
  (spread over the other tokens), and the entry is replaced by an unused id with
  probability 0.

Cost: O(N·k log k) for the duplicate test, plus a Python loop over the rare rows that hold
an out-of-range id.
"""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

#: A row whose top-k probabilities sum past 1 + this is padding, not a distribution.
MASS_TOLERANCE = 1e-3


def valid_rows(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: rows whose ids are distinct and whose probabilities sum to at most one."""
    ordered = ids.sort(-1).values
    distinct = ~(ordered[:, 1:] == ordered[:, :-1]).any(-1)
    normalized = logprobs.float().exp().sum(-1) <= 1 + MASS_TOLERANCE
    return distinct & normalized


def reference_topk(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [N, k] int64, logprobs [N, k], valid [N])`` from verl's teacher tensors.

    ``ids``/``logprobs`` are ``[..., k]`` (flattened to N rows). Out-of-range ids of valid
    rows are moved to an id the row does not use, with log-probability ``-inf``.
    """
    k = ids.shape[-1]
    ids = ids.reshape(-1, k).long()
    logprobs = logprobs.reshape(-1, k).detach()
    valid = valid_rows(ids, logprobs)
    outside = ((ids >= vocab_size) | (ids < 0)) & valid[:, None]
    if outside.any():
        ids, logprobs = ids.clone(), logprobs.clone()
        rows = outside.any(-1).nonzero().flatten().tolist()
        lost = float(logprobs[outside].float().exp().sum())
        LOG.debug("vocabmetric: %d top-k rows name ids >= %d (mass %.3g moved to the rest)", len(rows), vocab_size, lost)
        for r in rows:  # rare: only rows that name a padded-head id
            bad = outside[r]
            used = set(ids[r][~bad].tolist())
            free = [i for i in range(vocab_size - 1, -1, -1) if i not in used][: int(bad.sum())]
            ids[r, bad] = torch.tensor(free, dtype=ids.dtype, device=ids.device)
            logprobs[r, bad] = float("-inf")
    return ids, logprobs, valid
