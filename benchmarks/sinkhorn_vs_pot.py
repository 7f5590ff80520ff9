"""Sinkhorn divergence: ours (full vocabulary and support mode) against POT's dense
log-domain Sinkhorn, and our per-iteration cost against ``full_kl`` forward+backward.

Part 1, V ∈ {1024, 4096, 8192}: one position, OT_ε(p, q) (not debiased: POT computes one
term) on the same truncated kNN cost (POT gets it dense), both stopped at a marginal error
of 1e-4; time ratio and relative agreement, iterations to converge.
Part 2, V = 100277, N ∈ {64, 1024}: time of one kernel application (one Sinkhorn
half-step for every position) and of a whole converged debiased forward+backward, as
ratios to ``full_kl`` forward+backward on the same logits in the same run.

CPU timings on a shared machine are noisy: compare the ratios, not the seconds.

    .venv/bin/python benchmarks/sinkhorn_vs_pot.py [--sizes 64 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, write_results  # noqa: E402

from vocabmetric import CostOperator  # noqa: E402
from vocabmetric.regularizers import full_kl  # noqa: E402
from vocabmetric.regularizers import SinkhornDivergence  # noqa: E402
from vocabmetric.regularizers.sinkhorn import eps_schedule  # noqa: E402

EPS, K, TOL = 0.05, 16, 1e-4


def knn_operator(vocab_size: int, k: int = K, dim: int = 32, seed: int = 0) -> CostOperator:
    """kNN operator over clustered random embeddings (faiss IVF), costs = L2 / max, cap 1."""
    import faiss

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(vocab_size // 50, 4), dim)).astype(np.float32)
    x = centers[rng.integers(len(centers), size=vocab_size)] + 0.5 * rng.normal(size=(vocab_size, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if vocab_size <= 20000:
        index = faiss.IndexFlatL2(dim)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, 256)
        index.train(x)
        index.nprobe = 8
    index.add(x)
    dist, idx = index.search(x, k + 1)
    dist = np.sqrt(np.maximum(dist[:, 1:], 0)) / 2.0  # unit vectors: ‖x − y‖ ≤ 2
    return CostOperator(idx[:, 1:], dist, cap=1.0)


def lm_logits(n: int, vocab_size: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Peaked, heavy-tailed logits like a language model's."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab_size, generator=gen) * scale


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ot_value_pot(a, b, cost, eps):
    import ot

    plan, log = ot.sinkhorn(a, b, cost, reg=eps, method="sinkhorn_log", numItermax=100000, stopThr=TOL, log=True)
    pos = plan > 0
    value = float((plan * cost).sum() + eps * (plan[pos] * np.log(plan[pos] / np.outer(a, b)[pos])).sum())
    return value, int(log["niter"])


def part_pot(sizes=(1024, 4096, 8192)) -> list[dict]:
    rows = []
    for V in sizes:
        op = knn_operator(V).symmetrized()
        z, r = lm_logits(1, V, 1).double(), lm_logits(1, V, 2).double()
        p, q = torch.softmax(z, -1)[0].numpy(), torch.softmax(r, -1)[0].numpy()
        cost = op.dense().astype(np.float64)
        t_pot = timed(lambda: ot_value_pot(p, q, cost, EPS))
        pot_value, pot_iter = ot_value_pot(p, q, cost, EPS)
        row = {"V": V, "pot_s": t_pot, "pot_iterations": pot_iter, "pot_value": pot_value}
        for mode, support in (("full", None), ("support64", 64)):
            reg = SinkhornDivergence(op, eps=EPS, debias=False, tol=TOL, max_iter=1000, support=support)
            reg(z, r)  # build the kernel tables once (a module does it once)
            t = timed(lambda: reg(z, r), repeat=3)
            value = float(reg(z, r))
            row[f"{mode}_s"] = t
            row[f"{mode}_speedup_vs_pot"] = t_pot / t
            row[f"{mode}_rel_diff"] = abs(value - pot_value) / abs(pot_value)
            row[f"{mode}_iterations"] = reg.last_info["iterations"]
        # POT's dense float64 matrix is the baseline; ours in float32 is what training uses
        reg32 = SinkhornDivergence(op, eps=EPS, debias=False, tol=TOL, max_iter=1000)
        reg32(z.float(), r.float())
        row["full_f32_s"] = timed(lambda: reg32(z.float(), r.float()), repeat=3)
        row["full_f32_speedup_vs_pot"] = t_pot / row["full_f32_s"]
        row["full_f32_rel_diff"] = abs(float(reg32(z.float(), r.float())) - pot_value) / abs(pot_value)
        rows.append(row)
        print(row, flush=True)
    return rows


def part_kl_ratio(op: CostOperator, n: int) -> dict:
    V = op.vocab_size
    z, r = lm_logits(n, V, 3), lm_logits(n, V, 4)

    def kl_step():
        logits = z.clone().requires_grad_()
        full_kl(logits, r).sum().backward()

    t_kl = timed(kl_step, repeat=2)
    row = {"V": V, "N": n, "full_kl_fwd_bwd_s": t_kl}
    # one kernel application on every position: the unit of a Sinkhorn iteration
    reg = SinkhornDivergence(op, eps=EPS, tol=TOL, max_iter=300)
    kernel = reg.sparse_kernel("cpu", torch.float32)
    h = torch.log_softmax(r, -1)
    chunk = 16

    def one_application():
        for lo in range(0, n, chunk):
            kernel(h[lo : lo + chunk].t().contiguous(), EPS)  # token-major (V, rows)

    t_app = timed(one_application, repeat=2)
    row["kernel_application_s"] = t_app
    row["kernel_application_over_full_kl"] = t_app / t_kl
    row["mean_padded_width"] = kernel.width
    if n <= 64:
        for mode, support in (("full", None), ("support64", 64)):
            reg = SinkhornDivergence(op, eps=EPS, tol=TOL, max_iter=300, support=support)

            def step():
                logits = z.clone().requires_grad_()
                reg(logits, r).sum().backward()

            t = timed(step)
            row[f"{mode}_converged_fwd_bwd_s"] = t
            row[f"{mode}_converged_over_full_kl"] = t / t_kl
            row[f"{mode}_kernel_applications"] = reg.last_info["iterations"]
            row[f"{mode}_marginal_error"] = reg.last_info["marginal_error"]
            if support is None:
                row["full_per_application_over_full_kl"] = t / reg.last_info["iterations"] / t_kl
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 1024], help="N for part 2")
    parser.add_argument("--pot-sizes", type=int, nargs="*", default=[1024, 4096, 8192])
    parser.add_argument("--vocab", type=int, default=100277)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pot_rows = part_pot(args.pot_sizes)
    op = knn_operator(args.vocab).symmetrized()
    kl_rows = [part_kl_ratio(op, n) for n in args.sizes]
    payload = {
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "eps": EPS, "k": K, "tol": TOL, "eps_schedule": eps_schedule(EPS, 1.0, 0.5),
        "vs_pot": pot_rows,
        "vs_full_kl": kl_rows,
        "note": "CPU shared with other jobs: timings noisy, compare ratios",
    }
    md = ["# Sinkhorn divergence vs POT dense log-domain Sinkhorn and vs full_kl", "",
          f"ε = {EPS}·cap, kNN k = {K} (symmetrized), stopped at L1 marginal error {TOL}; "
          f"{payload['machine']['cpu']}, {payload['machine']['cores']} cores shared with other jobs "
          f"(noisy: compare ratios), torch threads {payload['torch_threads']}.", "",
          "| V | POT s (iters) | full f64 s | speed-up | rel. diff | full f32 speed-up | rel. diff f32 | support m=64 speed-up | rel. diff | our kernel applications |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in pot_rows:
        md.append(f"| {r['V']} | {r['pot_s']:.3f} ({r['pot_iterations']}) | {r['full_s']:.4f} | "
                  f"{r['full_speedup_vs_pot']:.0f}× | {r['full_rel_diff']:.1e} | {r['full_f32_speedup_vs_pot']:.0f}× | "
                  f"{r['full_f32_rel_diff']:.1e} | {r['support64_speedup_vs_pot']:.0f}× | {r['support64_rel_diff']:.1e} | "
                  f"{r['full_iterations']} |")
    md += ["", f"V = {args.vocab}: ratios to `full_kl` forward+backward on the same logits", "",
           "| N | full_kl s | one kernel application / full_kl | full converged fwd+bwd / full_kl (applications) | support m=64 converged / full_kl |",
           "|---|---|---|---|---|"]
    for r in kl_rows:
        full = f"{r['full_converged_over_full_kl']:.1f}× ({r['full_kernel_applications']})" if "full_converged_over_full_kl" in r else "—"
        sup = f"{r['support64_converged_over_full_kl']:.2f}×" if "support64_converged_over_full_kl" in r else "—"
        md.append(f"| {r['N']} | {r['full_kl_fwd_bwd_s']:.3f} | {r['kernel_application_over_full_kl']:.2f}× | {full} | {sup} |")
    path = write_results("sinkhorn_vs_pot", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote", path)


if __name__ == "__main__":
    main()
