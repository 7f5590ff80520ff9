"""Reproduce the table of Schulman, "Approximating KL Divergence" (2020), with kl_estimate.

Tokens x are drawn from π = N(0, 1); the reference is π_ref = N(μ, 1), μ ∈ {0.1, 1};
the true KL(π‖π_ref) = μ²/2. For k1, k2, k3 the table gives bias/true and stdev/true
three ways: Monte Carlo on 500 000 samples (with standard errors),
exact by Gauss–Hermite quadrature of the same ``kl_estimate`` calls, and as published.

    .venv/bin/python benchmarks/schulman_table.py     # writes results/schulman_table.{json,md}

``tests/test_schulman.py`` runs ``schulman_table`` on 5·10⁵ samples (another seed) and
checks it against the published numbers (Monte Carlo) and closed forms (quadrature).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from vocabmetric.regularizers import kl_estimate  # noqa: E402

PUBLISHED = {  # (mu, estimator): (bias/true, stdev/true)
    (0.1, "k1"): (0.0, 20.0), (0.1, "k2"): (0.002, 1.42), (0.1, "k3"): (0.0, 1.42),
    (1.0, "k1"): (0.0, 2.0), (1.0, "k2"): (0.25, 1.73), (1.0, "k3"): (0.0, 1.7),
}
N_SAMPLES = 500_000


def _log_normal(x: torch.Tensor, mu: float) -> torch.Tensor:
    return -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def _estimates(x: torch.Tensor, mu: float, estimator: str) -> torch.Tensor:
    # The tails of the quadrature reach |x| ≈ 20; no clamp so that k3 stays exact there.
    return kl_estimate(_log_normal(x, 0.0), _log_normal(x, mu), estimator, clamp=None)


def schulman_table(n_samples: int = N_SAMPLES, seed: int = 0) -> list[dict]:
    """One row per (μ, estimator): true KL, Monte Carlo, exact and published ratios."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, generator=generator, dtype=torch.float64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # ∫ f(x) e^{-x²/2} dx
    nodes = torch.from_numpy(nodes)
    weights = torch.from_numpy(weights / math.sqrt(2 * math.pi))
    rows = []
    for (mu, estimator), (pub_bias, pub_std) in PUBLISHED.items():
        true = mu**2 / 2
        k = _estimates(x, mu, estimator)
        mean, std = k.mean().item(), k.std().item()
        fourth = ((k - mean) ** 4).mean().item()
        k_nodes = _estimates(nodes, mu, estimator)
        exact_mean = (weights * k_nodes).sum().item()
        exact_std = math.sqrt((weights * (k_nodes - exact_mean) ** 2).sum().item())
        rows.append({
            "mu": mu, "estimator": estimator, "true_kl": true,
            "mc_bias": (mean - true) / true, "mc_bias_se": std / math.sqrt(n_samples) / true,
            "mc_std": std / true,
            # delta method: Var(s) ≈ (m4 - σ⁴) / (4 n σ²)
            "mc_std_se": math.sqrt(max(fourth - std**4, 0.0) / (4 * n_samples)) / std / true,
            "exact_bias": (exact_mean - true) / true, "exact_std": exact_std / true,
            "published_bias": pub_bias, "published_std": pub_std,
        })
    return rows


def to_markdown(rows: list[dict], n_samples: int = N_SAMPLES) -> str:
    lines = [
        f"x ~ N(0,1), reference N(mu,1); Monte Carlo on {n_samples:,} samples (± one standard "
        "error), exact by 80-node Gauss-Hermite quadrature, published = Schulman (2020).",
        "",
        "| mu | true KL | estimator | bias/true MC | exact | published "
        "| stdev/true MC | exact | published |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mu']} | {r['true_kl']:.3g} | {r['estimator']} "
            f"| {r['mc_bias']:+.4f} ± {r['mc_bias_se']:.4f} | {r['exact_bias']:+.4f} "
            f"| {r['published_bias']:g} "
            f"| {r['mc_std']:.3f} ± {r['mc_std_se']:.3f} | {r['exact_std']:.3f} "
            f"| {r['published_std']:g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from _machine import machine_info, write_results

    rows = schulman_table()
    payload = {"n_samples": N_SAMPLES, "seed": 0, "rows": rows, "machine": machine_info("cpu")}
    path = write_results("schulman_table", payload, to_markdown(rows))
    print(to_markdown(rows), f"\nwritten {path}")


if __name__ == "__main__":
    main()
