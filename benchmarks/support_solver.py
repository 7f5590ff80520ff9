"""Support-mode Sinkhorn: Newton steps against alternating updates for the pair OT(p, q).

Both solvers run the same support problems (top-m(p) ∪ top-m(q) + a rest bin, the same ε
schedule and symmetric problems) in float64; only the pair differs. For each case it
records the kernel applications per chunk (ε-scaling and symmetric problems included),
the final L1 marginal error, the wall time and the two values' largest relative gap:

* ``benchmark``: the inputs of ``regularizers.py`` (V = 100277, N = 64 peaky positions,
  random-neighbour operator, cap 1.5), m = 64, ε = 0.1 = cap/15, tol 1e-4 — the row that
  used to stop at ``max_iter``;
* a sweep on V = 3000 (16 positions, half of them with an unrelated reference): logits
  scale 1, 3, 6 (flat to peaked), m ∈ {16, 64}, ε/cap from 1 down to 0.01, Newton to
  tol 1e-8 in at most 100 steps, alternating updates to 1e-10 in at most 30,000.

    .venv/bin/python benchmarks/support_solver.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/support_solver.py --quick    # the benchmark case only
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402
from regularizers import git_state, peaky_logits, random_neighbour_operator  # noqa: E402

from vocabmetric.regularizers import SinkhornDivergence  # noqa: E402


def solve(op, z, r, *, m, eps, tol, max_iter, newton: bool) -> dict:
    """One forward in float64 with the pair solved by Newton (or alternating updates)."""
    reg = SinkhornDivergence(op, eps=eps, support=m, tol=tol, max_iter=max_iter,
                             acceleration="auto" if newton else "none")
    start = time.perf_counter()
    value = reg(z, r)
    seconds = time.perf_counter() - start
    info = reg.last_info
    return {"value": value, "seconds": seconds, "applications": info["iterations"],
            "marginal_error": max(info["marginal_error"], info.get("marginal_error_sym", 0.0))}


def case(name, op, z, r, *, m, eps_over_cap, newton_tol, alt_tol, alt_max) -> dict:
    eps = op.cap * eps_over_cap
    new = solve(op, z, r, m=m, eps=eps, tol=newton_tol, max_iter=100, newton=True)
    old = solve(op, z, r, m=m, eps=eps, tol=alt_tol, max_iter=alt_max, newton=False)
    gap = ((new["value"] - old["value"]).abs() / old["value"].abs().clamp_min(1e-12)).max().item()
    row = {"case": name, "m": m, "eps_over_cap": eps_over_cap, "relative_gap": gap}
    for key, res in (("newton", new), ("alternating", old)):
        row.update({f"{key}_{k}": v for k, v in res.items() if k != "value"})
    print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the benchmark case only")
    parser.add_argument("--name", default="support_solver")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the alternating runs stop at max_iter on purpose
    rows = []
    op = random_neighbour_operator(100277)
    z, r = (t.double() for t in peaky_logits(64, 100277))
    rows.append(case("benchmark inputs, V=100277, N=64", op, z, r, m=64, eps_over_cap=0.1 / op.cap,
                     newton_tol=1e-4, alt_tol=1e-4, alt_max=30000))
    if not args.quick:
        op = random_neighbour_operator(3000, k=16, seed=1)
        for scale in (1.0, 3.0, 6.0):
            g = torch.Generator().manual_seed(int(scale))
            z = torch.randn(16, 3000, generator=g, dtype=torch.float64) * scale
            r = z + 0.5 * torch.randn(16, 3000, generator=g, dtype=torch.float64)
            r[8:] = torch.randn(8, 3000, generator=g, dtype=torch.float64) * scale  # unrelated half
            for m in (16, 64):
                for frac in (1.0, 0.3, 0.1, 1 / 15, 0.03, 0.01):
                    rows.append(case(f"V=3000, N=16, logit scale {scale:g}", op, z, r, m=m, eps_over_cap=frac,
                                     newton_tol=1e-8, alt_tol=1e-10, alt_max=30000))
    payload = {"name": args.name, "machine": machine_info(), "git": git_state(), "rows": rows,
               "torch_threads": torch.get_num_threads()}
    write_results(args.name, payload, table(rows, payload))


def table(rows: list, payload: dict) -> str:
    lines = [
        "# Support-mode Sinkhorn: Newton steps vs alternating updates for the pair (float64)", "",
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores; commit "
        f"{payload['git']['commit'][:10]}. Kernel applications per chunk include ε-scaling and the symmetric "
        "problems; the gap is the largest relative difference of the two values.", "",
        "| case | m | ε / cap | Newton: applications | error | time (s) | alternating: applications | error | time (s) | gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['m']} | {r['eps_over_cap']:.3g} | {r['newton_applications']} | "
            f"{r['newton_marginal_error']:.1e} | {r['newton_seconds']:.2f} | {r['alternating_applications']} | "
            f"{r['alternating_marginal_error']:.1e} | {r['alternating_seconds']:.2f} | {r['relative_gap']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
