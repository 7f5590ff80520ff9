"""KL penalties for RL fine-tuning: sampled-token estimators, exact KL, reward form.

A trainer penalizes the policy π for drifting from a reference π_ref. Three forms:

* :func:`kl_estimate` — per-token estimates k1, k2, k3, abs, k1+, k3+ (Schulman 2020) of
  KL(π‖π_ref) from the log-probabilities of tokens sampled from π. Their *values* and
  their *gradients as a loss* are different things; each docstring states both, and
  ``tests/test_kl.py`` proves each statement exactly by enumerating small distributions.
* :func:`~vocabmetric.regularizers.exact_kl.full_kl` — the exact KL over the whole
  vocabulary per position, from logits (its own module, with the :class:`FullKL` penalty).
* :func:`kl_in_reward` — k1 placed in the return (reward-to-go), the form whose
  policy-gradient is the unbiased gradient of the sequence-level reverse KL.

:func:`~vocabmetric.regularizers.reduction.aggregate` reduces per-token values to the scalar loss the way trainers do.

Conventions: ``logp = log π(x)`` carries the gradient, ``ref_logp = log π_ref(x)`` does
not, ``log_ratio = logp - ref_logp``. ``-inf`` is an exact zero probability; NaN is an
error. Low-precision inputs (bf16, fp16) are computed in float32.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ._inputs import check_logprobs, check_same_shape as _check_same_shape, compute_dtype

ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")

# --------------------------------------------------------------------------------------
# sampled-token estimators


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    *,
    clamp: float | None = 20.0,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-token estimate of KL(π‖π_ref) from tokens sampled from π.

    With :math:`r = \mathrm{clip}(\log π(x) - \log π_{ref}(x), -c, c)`:

    ========  ===========================  =============================================
    name      value                        gradient as an on-policy loss, E_{x∼π}[∇·]
    ========  ===========================  =============================================
    ``k1``    :math:`r`                    0 — it does nothing
    ``k2``    :math:`r^2/2`                ∇ KL(π‖π_ref), the true reverse-KL gradient
    ``k3``    :math:`e^{-r} - 1 + r`       ∇ KL(π_ref‖π), the *forward*-KL gradient
    ``abs``   :math:`|r|`                  Σ π·sign(r)·∇log π: no KL's (for logging)
    ``k1+``   value of k1, gradient of k2  ∇ KL(π‖π_ref)
    ``k3+``   value of k3, gradient of k2  ∇ KL(π‖π_ref)
    ========  ===========================  =============================================

    Values: k1 and k3 are unbiased for KL(π‖π_ref) (k3 ≥ 0, lower variance when π ≈
    π_ref; its unbiasedness needs supp π_ref ⊆ supp π, and both are exact only where the
    clamp does not bind); k2 is biased (E[k2] ≠ KL) but has low variance; k1 is noisy.
    The gradient column holds exactly in expectation over x ∼ π when only ``logp(x)``
    is differentiated (the sampling weights are constants), which is what a trainer
    does when it adds ``kl_estimate(...)`` to its loss.

    **Off-policy** (``old_logp`` given, tokens sampled from π_old, as in PPO/GRPO
    mini-batches after the first): the value is multiplied by the importance weight
    :math:`w = π/π_{old} = \exp(\mathrm{clip}(\log π - \log π_{old}, -c, c))`, the
    DeepSeek-V3.2 form :math:`w\,k`. Detached: ``ref_logp`` and ``old_logp`` always.
    *Not* detached: ``logp`` inside both r and w — the weight carries the gradient, so
    :math:`E_{x∼π_{old}}[w\,k]` is unbiased for :math:`E_{x∼π}[k]` in value *and*
    gradient: for ``k1`` and ``k3`` the gradient becomes ∇ KL(π‖π_ref) (this holds also
    when π_old = π, i.e. ``old_logp=logp.detach()``, where w = 1 in value but not in
    gradient); for ``k2`` and ``abs`` it is ∇ E_π[k], no KL's. (A detached weight,
    sg(w)·k3, would give ∇ KL(π_ref‖π) again.) ``k1+`` / ``k3+`` keep their rule: value
    :math:`w\,k`, gradient that of :math:`\mathrm{sg}(w)\,k_2` (weight detached
    there), which is ∇ KL(π‖π_ref).

    Parameters
    ----------
    logp : Tensor, shape (...)
        :math:`\log π(x)` of the sampled tokens, with grad.
    ref_logp : Tensor, shape (...)
        :math:`\log π_{ref}(x)`, same shape; never differentiated.
    estimator : {"k1", "k2", "k3", "abs", "k1+", "k3+"}
    clamp : float or None
        Bound c on |log_ratio| (and on |log π/π_old|), applied *before* any ``exp``:
        values are at most :math:`e^c` and neither value nor gradient is ever inf or NaN,
        for any finite or ±inf input. Where the clamp binds, the gradient through the
        ratio is zero (``torch.clamp``), as with the trainers' clamps. ``None`` disables
        it and computes the exact formulas: k3 is then inf when π ≪ π_ref, and infinite
        inputs (log π = -inf) give inf or NaN — use ``None`` for analysis, not training.
    old_logp : Tensor, shape (...), optional
        :math:`\log π_{old}(x)` of the policy that sampled the tokens; never differentiated.

    Returns
    -------
    Tensor, shape (...)
        Per-token values, float32 for low-precision inputs, else the input dtype.
        Cost O(numel), elementwise.

    Raises
    ------
    VocabMetricError
        NaN in an input (the message names it), or shapes that differ (names both).
    ConfigError
        Unknown ``estimator`` or a non-positive ``clamp``.

    Examples
    --------
    >>> loss = aggregate(kl_estimate(logp, ref_logp, "k3+"), mask, "token-mean")
    """
    where = "kl_estimate"
    if estimator not in ESTIMATORS:
        raise ConfigError(f"{where}: unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    _check_clamp(clamp, where)
    _check_same_shape(where, logp=logp, ref_logp=ref_logp, old_logp=old_logp)
    log_ratio = _log_ratio(logp, ref_logp, clamp, where, ("logp", "ref_logp"))

    k2 = log_ratio.square() / 2
    if estimator == "k1":
        value = log_ratio
    elif estimator == "k2":
        value = k2
    elif estimator == "abs":
        value = log_ratio.abs()
    else:  # k3, k1+, k3+
        value = log_ratio if estimator == "k1+" else torch.expm1(-log_ratio) + log_ratio

    straight_through = estimator.endswith("+")
    if old_logp is not None:
        log_weight = _log_ratio(logp, old_logp, clamp, where, ("logp", "old_logp"))
        weight = log_weight.exp()
        if straight_through:
            k2 = weight.detach() * k2
            value = weight.detach() * value
        else:
            value = weight * value
    if straight_through:
        # value exactly (x - x == 0), gradient of k2: no rounding from value - k2 + k2
        value = value.detach() + (k2 - k2.detach())
    return value


def _log_ratio(
    logp: torch.Tensor, other: torch.Tensor, clamp: float | None, where: str, names: tuple
) -> torch.Tensor:
    """``clip(logp - other)`` in a float ≥ 32 bits, with ``other`` detached.

    Equal infinities (both -inf: a token impossible under both) give 0, not NaN; the
    clamp comes before any ``exp`` so downstream values and gradients stay finite.
    Equal *finite* values keep their gradient (d log_ratio / d logp = 1): π = π_ref at
    initialization and ``old_logp = logp.detach()`` on the first PPO mini-batch are the
    common case, and the importance weight's gradient must survive there.
    """
    check_logprobs(logp, names[0], where)
    check_logprobs(other, names[1], where)
    dtype = compute_dtype(logp.dtype, other.dtype)
    logp, other = logp.to(dtype), other.detach().to(dtype)
    same_infinity = (logp == other) & torch.isinf(other)
    log_ratio = torch.where(same_infinity, 0.0, logp - other)
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return log_ratio


# --------------------------------------------------------------------------------------
# sequence level


def kl_in_reward(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, clamp: float | None = 20.0
) -> torch.Tensor:
    r"""The KL penalty as a return: :math:`R_t = \sum_{s \ge t} m_s\, k1_s`, detached.

    Put :math:`-β R_t` into the advantage (or :math:`-β\,k1_t` into the per-token reward
    and let the return sum it) of a policy-gradient loss
    :math:`-\sum_t A_t \log π(x_t \mid x_{<t})`. For sequences sampled from π,

    .. math:: E\Big[\sum_t ∇\log π(x_t \mid x_{<t})\, R_t\Big] = ∇\,KL(π‖π_{ref})

    over whole (masked) sequences: the unbiased gradient of the *sequence* reverse KL,
    including the effect of each token on the prefixes that follow — which no per-token
    loss (``kl_estimate`` with k2, k1+, k3+) gives: those differentiate the per-position
    KLs at the sampled prefixes only.

    Parameters
    ----------
    logp, ref_logp : Tensor, shape (..., T)
        Log-probabilities of the sampled tokens under π and π_ref (any grad is ignored).
    mask : Tensor, shape (..., T)
        Bool or {0, 1}: the response tokens. Masked positions contribute nothing and get 0.
    clamp : float or None
        Bound on |log_ratio| per token, as in :func:`kl_estimate` (-inf stays finite).

    Returns
    -------
    Tensor, shape (..., T)
        Reward-to-go of k1, no grad. Cost O(numel).
    """
    where = "kl_in_reward"
    _check_clamp(clamp, where)
    _check_same_shape(where, logp=logp, ref_logp=ref_logp, mask=mask)
    keep = mask != 0
    k1 = _log_ratio(logp.detach(), ref_logp, clamp, where, ("logp", "ref_logp"))
    k1 = torch.where(keep, k1, 0.0)
    returns = k1.flip(-1).cumsum(-1).flip(-1)
    return torch.where(keep, returns, 0.0)


# --------------------------------------------------------------------------------------
# shared checks


def _check_clamp(clamp: float | None, where: str) -> None:
    if clamp is not None and not (clamp > 0 and math.isfinite(clamp)):
        raise ConfigError(f"{where}: clamp must be a positive finite number or None, got {clamp!r}")
