"""Tests for vocabmetric.regularizers.kl: every gradient statement of the docstrings, proven.

The expected gradient of a sampled loss is E_{x∼π}[∇_θ k(x)] = Σ_x π(x)·∇_θ k(x) with π(x) a
constant weight. On a categorical distribution over a handful of tokens that sum is exact, so
each statement ("k3 as a loss gives the forward-KL gradient", …) is checked against autograd
of the closed-form KL to 1e-10 in float64 — then once more by sampling, with a tolerance of
five standard errors (batch means), and with a check that the *wrong* KL is rejected.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vocabmetric.errors import ConfigError, VocabMetricError
from vocabmetric.regularizers import aggregate, full_kl, kl_estimate, kl_in_reward

VOCAB = 5
ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")


def _logits(seed: int, scale: float = 1.0, size=(VOCAB,)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(size, generator=generator, dtype=torch.float64)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Closed form KL(p‖q) = Σ p (log p − log q) over the last dimension."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _grad(scalar: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(scalar, theta, retain_graph=True)
    return g


def _policy_and_reference(seed: int):
    theta = _logits(seed).requires_grad_()
    ref_logp = torch.log_softmax(_logits(seed + 100), -1)
    return theta, ref_logp


# --------------------------------------------------------------------------------------
# exact expectations by enumerating the support

# estimator -> which closed-form KL its expected loss-gradient equals
GRADIENT_OF = {"k2": "reverse", "k3": "forward", "k1+": "reverse", "k3+": "reverse"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k1+", "k3+"])
def test_expected_gradient_as_loss_is_exact(estimator, seed):
    """Σ_x π(x)·∇k(x): k1 → 0, k2/k1+/k3+ → ∇KL(π‖π_ref), k3 → ∇KL(π_ref‖π)."""
    theta, ref_logp = _policy_and_reference(seed)
    logp = torch.log_softmax(theta, -1)
    weights = logp.exp().detach()  # the sampling distribution is not differentiated
    expected_grad = _grad((weights * kl_estimate(logp, ref_logp, estimator)).sum(), theta)

    reverse = _grad(_kl(torch.log_softmax(theta, -1), ref_logp), theta)
    forward = _grad(_kl(ref_logp, torch.log_softmax(theta, -1)), theta)
    target = {"reverse": reverse, "forward": forward}.get(GRADIENT_OF.get(estimator))
    if estimator == "k1":
        target = torch.zeros_like(reverse)
    torch.testing.assert_close(expected_grad, target, rtol=0, atol=1e-10)
    # the statement has teeth: reverse and forward gradients differ here
    assert (reverse - forward).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_values_k1_k3_unbiased_k2_biased(seed):
    theta, ref_logp = _policy_and_reference(seed)
    logp = torch.log_softmax(theta, -1).detach()
    pi = logp.exp()
    true_kl = _kl(logp, ref_logp)
    for estimator in ("k1", "k3", "k1+", "k3+"):
        mean = (pi * kl_estimate(logp, ref_logp, estimator)).sum()
        torch.testing.assert_close(mean, true_kl, rtol=1e-12, atol=0)
    k2_mean = (pi * kl_estimate(logp, ref_logp, "k2")).sum()
    assert abs(k2_mean - true_kl) > 1e-3 * true_kl


@pytest.mark.parametrize("estimator", ["k1", "k3", "k1+", "k3+"])
@pytest.mark.parametrize("same_as_policy", [False, True])
def test_off_policy_weight_gives_reverse_kl_gradient(estimator, same_as_policy):
    """x ∼ π_old, loss w·k with w = π/π_old: Σ π_old·∇(w k) = ∇KL(π‖π_ref), also at π_old = π."""
    theta, ref_logp = _policy_and_reference(3)
    logp = torch.log_softmax(theta, -1)
    old_logp = logp.detach() if same_as_policy else torch.log_softmax(_logits(7), -1)
    old_pi = old_logp.exp()
    values = kl_estimate(logp, ref_logp, estimator, old_logp=old_logp)
    torch.testing.assert_close((old_pi * values).sum(), _kl(logp, ref_logp), rtol=1e-12, atol=0)
    expected_grad = _grad((old_pi * values).sum(), theta)
    reverse = _grad(_kl(torch.log_softmax(theta, -1), ref_logp), theta)
    torch.testing.assert_close(expected_grad, reverse, rtol=0, atol=1e-10)


def test_off_policy_detached_weight_would_give_forward_gradient():
    """The docstring's warning: sg(w)·k3 differentiates KL(π_ref‖π), hence w keeps its grad."""
    theta, ref_logp = _policy_and_reference(4)
    logp = torch.log_softmax(theta, -1)
    old_logp = torch.log_softmax(_logits(8), -1)
    weight = (logp - old_logp).exp().detach()
    loss = (old_logp.exp() * weight * kl_estimate(logp, ref_logp, "k3")).sum()
    forward = _grad(_kl(ref_logp, torch.log_softmax(theta, -1)), theta)
    torch.testing.assert_close(_grad(loss, theta), forward, rtol=0, atol=1e-10)


def test_straight_through_value_of_k1_k3_gradient_of_k2_per_token():
    logp = torch.tensor([-0.3, -2.0, -5.0, -0.01], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.tensor([-1.0, -0.5, -5.0, -9.0], dtype=torch.float64)
    grad_k2 = _grad(kl_estimate(logp, ref_logp, "k2").sum(), logp)
    for plus, plain in (("k1+", "k1"), ("k3+", "k3")):
        value = kl_estimate(logp, ref_logp, plus)
        assert torch.equal(value.detach(), kl_estimate(logp, ref_logp, plain).detach())
        assert torch.equal(_grad(value.sum(), logp), grad_k2)
    # k2's per-token gradient is log_ratio: check against the formula, not the code
    torch.testing.assert_close(grad_k2, (logp - ref_logp).detach())


# --------------------------------------------------------------------------------------
# the same statements by Monte Carlo


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k3+"])
def test_expected_gradient_by_sampling(estimator):
    """100 000 tokens sampled from π; tolerance 5 standard errors (40 batch means)."""
    theta, ref_logp = _policy_and_reference(5)
    theta = (2 * theta.detach()).requires_grad_()  # π far from π_ref: the KLs differ clearly
    generator = torch.Generator().manual_seed(11)
    n_batches, batch = 40, 2_500
    pi = torch.softmax(theta.detach(), -1)
    samples = torch.multinomial(pi, n_batches * batch, replacement=True, generator=generator)
    logp_all = torch.log_softmax(theta, -1)
    loss = kl_estimate(logp_all[samples], ref_logp[samples], estimator).mean()
    # per-token gradients d k / d log π(x_i), then the chain rule ∇_θ log π(x) = e_x − π
    token_logp = logp_all.detach()[samples].requires_grad_()
    per_token = _grad(kl_estimate(token_logp, ref_logp[samples], estimator).sum(), token_logp)
    per_sample = per_token[:, None] * (torch.nn.functional.one_hot(samples, VOCAB) - pi)
    grads = per_sample.reshape(n_batches, batch, VOCAB).mean(1)
    mean, standard_error = grads.mean(0), grads.std(0) / math.sqrt(n_batches)
    torch.testing.assert_close(_grad(loss, theta), mean, rtol=1e-9, atol=1e-12)
    reverse = _grad(_kl(torch.log_softmax(theta, -1), ref_logp), theta)
    forward = _grad(_kl(ref_logp, torch.log_softmax(theta, -1)), theta)
    target = {"k1": torch.zeros_like(reverse), "k2": reverse, "k3": forward, "k3+": reverse}[estimator]
    wrong = {"k1": reverse, "k2": forward, "k3": reverse, "k3+": forward}[estimator]
    assert ((mean - target).abs() <= 5 * standard_error + 1e-12).all(), (mean, target, standard_error)
    assert ((mean - wrong).abs() > 5 * standard_error).any(), "the test cannot tell the KLs apart"


# --------------------------------------------------------------------------------------
# the KL in the reward, over whole sequences

SEQ_VOCAB, SEQ_LEN = 3, 3


def _prefix_index(prefix: tuple) -> int:
    """Index of a prefix among all prefixes of length 0..SEQ_LEN-1 (shortest first)."""
    offset = sum(SEQ_VOCAB**k for k in range(len(prefix)))
    return offset + sum(x * SEQ_VOCAB ** (len(prefix) - 1 - i) for i, x in enumerate(prefix))


def _sequence_logps(table: torch.Tensor, sequence: tuple) -> torch.Tensor:
    """log π(x_t | x_<t) for t = 0..T-1 under an autoregressive policy given as a table."""
    rows = torch.stack([table[_prefix_index(sequence[:t])] for t in range(len(sequence))])
    return torch.log_softmax(rows, -1)[torch.arange(len(sequence)), torch.tensor(sequence)]


@pytest.mark.parametrize("seq_len", [2, 3])
def test_kl_in_reward_reinforce_gradient_is_sequence_kl_gradient(seq_len):
    """Σ_seq π(seq)·Σ_t ∇log π(x_t|x_<t)·R_t = ∇ KL(π‖π_ref) over sequences; a per-token k2 loss is not."""
    n_prefixes = sum(SEQ_VOCAB**k for k in range(SEQ_LEN))
    theta = _logits(20, 1.5, (n_prefixes, SEQ_VOCAB)).requires_grad_()
    ref_table = _logits(21, 1.5, (n_prefixes, SEQ_VOCAB))
    sequences = list(itertools.product(range(SEQ_VOCAB), repeat=seq_len))
    logp = torch.stack([_sequence_logps(theta, s) for s in sequences])  # [S, T]
    ref_logp = torch.stack([_sequence_logps(ref_table, s) for s in sequences])
    seq_prob = logp.sum(-1).exp()
    torch.testing.assert_close(seq_prob.sum(), torch.tensor(1.0, dtype=torch.float64))

    sequence_kl = (seq_prob * (logp - ref_logp).sum(-1)).sum()
    returns = kl_in_reward(logp, ref_logp, torch.ones_like(logp, dtype=torch.bool))
    assert not returns.requires_grad
    reinforce = (seq_prob.detach() * (logp * returns).sum(-1)).sum()
    torch.testing.assert_close(_grad(reinforce, theta), _grad(sequence_kl, theta), rtol=0, atol=1e-10)

    per_token_k2 = (seq_prob.detach() * kl_estimate(logp, ref_logp, "k2").sum(-1)).sum()
    assert (_grad(per_token_k2, theta) - _grad(sequence_kl, theta)).abs().max() > 1e-3


def test_kl_in_reward_is_masked_reward_to_go():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.2, -0.2, -0.1, -9.9]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    k1 = [[0.5, -1.0, 0.0, -2.0], [0.1, 0.0, -0.2, 9.5]]
    expected = torch.tensor([
        [0.0, k1[0][1] + k1[0][2] + k1[0][3], k1[0][2] + k1[0][3], k1[0][3]],
        [k1[1][0] + k1[1][1], k1[1][1], 0.0, 0.0],
    ])
    torch.testing.assert_close(kl_in_reward(logp, ref_logp, mask), expected)


def test_kl_in_reward_impossible_reference_token_is_clamped():
    logp = torch.tensor([[-1.0, -1.0]])
    ref_logp = torch.tensor([[-float("inf"), -1.0]])
    returns = kl_in_reward(logp, ref_logp, torch.ones(1, 2), clamp=10.0)
    torch.testing.assert_close(returns, torch.tensor([[10.0, 0.0]]))


# --------------------------------------------------------------------------------------
# aggregation


def test_aggregate_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last sequence is empty
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(((1 + 2) / 2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    # leading dims are flattened into sequences
    stacked = torch.stack([values.detach(), values.detach()])
    assert aggregate(stacked, torch.stack([mask, mask]), "seq-mean-token-mean").item() == pytest.approx(2.75)
    # gradient: token-mean gives each kept token 1/3, masked ones 0
    (grad,) = torch.autograd.grad(aggregate(values, mask, "token-mean"), values)
    torch.testing.assert_close(grad, mask.float() / 3)


def test_aggregate_masked_inf_nan_do_not_leak_and_empty_mask_is_zero():
    values = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss = aggregate(values, mask, mode)
        (grad,) = torch.autograd.grad(loss, values)
        assert loss.item() == pytest.approx(2.0)
        assert torch.isfinite(grad).all() and grad[0, 1] == 0 and grad[1, 0] == 0
    empty = aggregate(values, torch.zeros(2, 2), "token-mean")
    assert empty.item() == 0.0 and empty.requires_grad


# --------------------------------------------------------------------------------------
# stability: clamp before exp, finite for any input

# +inf is no log-probability and is refused (tests/test_inputs.py); finite values of any
# size, even positive ones, give finite values and gradients
EXTREMES = [-math.inf, -3e38, 3e38, -1e30, 1e30, -80.0, 0.0, 80.0]


def test_clamp_is_applied_to_the_log_ratio_before_exp():
    logp = torch.tensor([-math.inf, -1000.0, -3e38, 5.0], requires_grad=True)
    ref_logp = torch.tensor([-1.0, 0.0, 3e38, -math.inf])
    k3 = kl_estimate(logp, ref_logp, "k3", clamp=20.0)
    low, high = math.exp(20) - 1 - 20, math.exp(-20) - 1 + 20  # k3 at log_ratio = ∓20
    torch.testing.assert_close(k3.detach(), torch.tensor([low, low, low, high]))
    grad = _grad(k3.sum(), logp)
    assert torch.equal(grad, torch.zeros(4))  # the clamp binds: no gradient through the ratio


@settings(max_examples=300, deadline=None)
@given(
    logp=st.one_of(st.sampled_from(EXTREMES), st.floats(-1e38, 1e38)),
    ref_logp=st.one_of(st.sampled_from(EXTREMES), st.floats(-1e38, 1e38)),
    old_logp=st.one_of(st.none(), st.sampled_from(EXTREMES), st.floats(-1e38, 1e38)),
    estimator=st.sampled_from(ESTIMATORS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_value_and_gradient_finite_for_any_input(logp, ref_logp, old_logp, estimator, dtype):
    x = torch.tensor([logp], dtype=dtype, requires_grad=True)
    old = None if old_logp is None else torch.tensor([old_logp], dtype=dtype)
    value = kl_estimate(x, torch.tensor([ref_logp], dtype=dtype), estimator, old_logp=old)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert value.item() <= math.exp(40) + 1  # |log_ratio| ≤ 20 and w ≤ e^20


def test_gradient_survives_where_logp_equals_reference_or_old():
    """π = π_ref at a token (initialization) or old_logp = logp.detach(): d/dlogp is not cut."""
    logp = torch.tensor([-1.0], requires_grad=True)
    assert _grad(kl_estimate(logp, torch.tensor([-1.0]), "k1"), logp).item() == 1.0
    # w·k1 with w = e^{logp - old}: d/dlogp = w·k1 + w = k1 + 1 at w = 1
    value = kl_estimate(logp, torch.tensor([-3.0]), "k1", old_logp=logp.detach())
    assert _grad(value, logp).item() == pytest.approx(3.0)


def test_low_precision_inputs_compute_in_float32():
    logp = torch.tensor([-0.5, -3.0], dtype=torch.bfloat16, requires_grad=True)
    value = kl_estimate(logp, torch.tensor([-1.0, -1.0], dtype=torch.bfloat16), "k3")
    assert value.dtype == torch.float32
    assert _grad(value.sum(), logp).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name", ["logp", "ref_logp", "old_logp"])
def test_nan_input_names_the_argument(name):
    args = {"logp": torch.zeros(3), "ref_logp": torch.zeros(3), "old_logp": torch.zeros(3)}
    args[name] = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(VocabMetricError, match=rf"kl_estimate: {name} contains NaN"):
        kl_estimate(args["logp"], args["ref_logp"], "k3", old_logp=args["old_logp"])


def test_mismatched_shapes_name_both_shapes():
    with pytest.raises(VocabMetricError, match=r"logp \(2, 3\).*ref_logp \(3, 2\)"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(VocabMetricError, match=r"logits \(2, 5\) and ref_logits \(2, 4\)"):
        full_kl(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(VocabMetricError, match=r"values \(2, 3\).*mask \(2, 4\)"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(VocabMetricError, match=r"logp \(4,\).*mask \(3,\)"):
        kl_in_reward(torch.zeros(4), torch.zeros(4), torch.ones(3))


def test_bad_options_are_config_errors():
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown estimator 'k4'"):
        kl_estimate(x, x, "k4")
    for clamp in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="clamp must be a positive finite number"):
            kl_estimate(x, x, clamp=clamp)
    with pytest.raises(ConfigError, match="unknown mode 'mean'"):
        aggregate(x, x, "mean")
    with pytest.raises(ConfigError, match="unknown direction 'both'"):
        full_kl(torch.zeros(2, 3), torch.zeros(2, 3), direction="both")
    with pytest.raises(ConfigError, match="chunk_size must be a positive int"):
        full_kl(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=0)


@pytest.mark.parametrize(
    ("bad", "name", "message"),
    [
        (float("nan"), "logits", "logits contains NaN"),
        (float("nan"), "ref_logits", "ref_logits contains NaN"),
        (float("inf"), "logits", "logits contains \\+inf"),
        ("row", "ref_logits", "ref_logits row 1 \\(flattened\\) is all -inf"),
    ],
)
def test_full_kl_bad_logits_are_named(bad, name, message):
    tensors = {"logits": torch.zeros(3, 4), "ref_logits": torch.zeros(3, 4)}
    if bad == "row":
        tensors[name][1] = -math.inf
    else:
        tensors[name][2, 1] = bad
    with pytest.raises(VocabMetricError, match=f"full_kl: {message}"):
        full_kl(tensors["logits"], tensors["ref_logits"])


# --------------------------------------------------------------------------------------
# full_kl


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_matches_torch_distributions_and_plain_expression(direction):
    logits = _logits(30, 2.0, (4, 6, 33)).requires_grad_()
    ref_logits = _logits(31, 2.0, (4, 6, 33))
    policy = torch.distributions.Categorical(logits=logits)
    reference = torch.distributions.Categorical(logits=ref_logits)
    pair = (policy, reference) if direction == "reverse" else (reference, policy)
    expected = torch.distributions.kl_divergence(*pair)
    value = full_kl(logits, ref_logits, direction=direction, chunk_size=5)
    assert value.shape == (4, 6) and value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)

    upstream = _logits(32, 1.0, (4, 6))  # a non-uniform upstream gradient
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    plain = _kl(logp, logq) if direction == "reverse" else _kl(logq, logp)
    torch.testing.assert_close(
        _grad((value * upstream).sum(), logits), _grad((plain * upstream).sum(), logits),
        rtol=1e-10, atol=1e-13,
    )


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_identical_for_every_chunk_size(direction):
    logits = _logits(40, 3.0, (37, 101)).float().requires_grad_()
    ref_logits = _logits(41, 3.0, (37, 101)).float()
    upstream = torch.rand(37, generator=torch.Generator().manual_seed(0))
    results = []
    for chunk_size in (1, 4, 10, 37, 1000, None):
        value = full_kl(logits, ref_logits, direction=direction, chunk_size=chunk_size)
        results.append((value.detach(), _grad((value * upstream).sum(), logits)))
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_gradcheck(direction):
    logits = _logits(50, 1.0, (3, 7)).requires_grad_()
    ref_logits = _logits(51, 1.0, (3, 7))
    if direction == "forward":
        ref_logits[1, 2] = -math.inf  # ρ = 0 where π > 0: KL(ρ‖π) stays finite and smooth
    assert torch.autograd.gradcheck(
        lambda z: full_kl(z, ref_logits, direction=direction, chunk_size=2), (logits,)
    )


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_bf16_accumulates_in_float32(direction):
    logits = _logits(60, 3.0, (16, 4099)).to(torch.bfloat16).requires_grad_()
    ref_logits = _logits(61, 3.0, (16, 4099)).to(torch.bfloat16)
    value = full_kl(logits, ref_logits, direction=direction)
    assert value.dtype == torch.float32
    exact = full_kl(logits.detach().double(), ref_logits.double(), direction=direction)
    torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=1e-6)
    grad = _grad(value.sum(), logits)
    assert grad.dtype == torch.bfloat16
    z = logits.detach().double().requires_grad_()
    exact_grad = _grad(full_kl(z, ref_logits.double(), direction=direction).sum(), z)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-2, atol=1e-5)  # bf16 rounding


@pytest.mark.parametrize("chunk_size", [1, None])  # zero-free chunks beside chunks with zeros
def test_full_kl_exact_zeros_in_either_distribution(chunk_size):
    """0·log 0 = 0; mass where the other distribution has none → +inf, gradient 0 (reverse)."""
    inf = math.inf
    logits = torch.tensor([[0.0, 1.0, -inf, 2.0], [0.0, 1.0, 0.5, 2.0], [0.0, 1.0, 0.5, -inf]],
                          dtype=torch.float64, requires_grad=True)
    ref_logits = torch.tensor([[0.5, 0.0, 1.0, 1.0], [0.5, 0.0, -inf, 1.0], [0.5, 0.0, 1.0, -inf]],
                              dtype=torch.float64)

    def by_hand(p_logits, q_logits):  # Σ over the support of p; inf if q lacks any of it
        p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
        support = p > 0
        if (q[support] == 0).any():
            return inf
        return float((p[support] * (p[support] / q[support]).log()).sum())

    reverse = full_kl(logits, ref_logits, direction="reverse", chunk_size=chunk_size)
    forward = full_kl(logits, ref_logits, direction="forward", chunk_size=chunk_size)
    for row in range(3):
        assert reverse[row].item() == pytest.approx(by_hand(logits[row].detach(), ref_logits[row]), rel=1e-12)
        assert forward[row].item() == pytest.approx(by_hand(ref_logits[row], logits[row].detach()), rel=1e-12)
    assert math.isinf(reverse[1].item()) and math.isinf(forward[0].item())
    assert math.isfinite(reverse[0].item()) and math.isfinite(reverse[2].item())

    # an inf position masked away leaves a finite loss with finite gradients elsewhere
    keep = torch.tensor([True, False, True])
    loss = aggregate(reverse, keep, "token-mean")
    grad = _grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(4))
    # the finite rows' gradients match the plain expression over the support (0 at -inf logits)
    for row in (0, 2):
        z = logits[row].detach().clone().requires_grad_()
        support = torch.isfinite(z)
        p_log = torch.log_softmax(z[support], -1)
        q_log = torch.log_softmax(ref_logits[row], -1)[support]
        plain_grad = _grad(_kl(p_log, q_log), z)
        torch.testing.assert_close(grad[row], plain_grad / 2, rtol=1e-10, atol=1e-14)
    # forward: gradient π − ρ stays finite even at the +inf position
    forward_grad = _grad(forward.sum(), logits)
    expected = torch.softmax(logits.detach(), -1) - torch.softmax(ref_logits, -1)
    torch.testing.assert_close(forward_grad, expected, rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    direction=st.sampled_from(["reverse", "forward"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_full_kl_never_nan_and_gradient_always_finite(data, direction, dtype):
    """Logits up to ±1e4 with -inf entries: KL ≥ 0, inf only where the support says so."""
    entry = st.one_of(st.floats(-1e4, 1e4), st.just(-math.inf))
    rows = [data.draw(st.lists(entry, min_size=6, max_size=6).filter(lambda r: max(r) > -math.inf))
            for _ in range(6)]
    logits = torch.tensor(rows[:3], dtype=dtype, requires_grad=True)
    ref_logits = torch.tensor(rows[3:], dtype=dtype)
    value = full_kl(logits, ref_logits, direction=direction, chunk_size=2)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert not torch.isnan(value).any() and (value >= -1e-5).all()
    assert torch.isfinite(grad).all()
    measuring, other = (logits, ref_logits) if direction == "reverse" else (ref_logits, logits)
    support_ok = ~(torch.isfinite(measuring) & torch.isneginf(other)).any(-1)
    assert torch.isfinite(value[support_ok]).all()


@pytest.mark.parametrize("policy_device, ref_device", [("cpu", "meta"), ("meta", "cpu"), ("meta", "meta")])
def test_full_kl_refuses_a_meta_or_other_device_input_instead_of_a_made_up_number(policy_device, ref_device):
    # a meta tensor holds no values: the KL of one was returned as 0 (a wrong number, silently)
    logits = torch.randn(3, 7, device=policy_device, requires_grad=True)
    ref = torch.randn(3, 7, device=ref_device)
    with pytest.raises(VocabMetricError, match=f"full_kl: reference logits are on {ref_device}, "
                                               f"policy logits on {policy_device}"):
        full_kl(logits, ref)
