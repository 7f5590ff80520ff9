"""One full-vocabulary Sinkhorn kernel application beside MKL's sparse × dense product.

A Sinkhorn half-step on the truncated cost is ``log(S·E + dense)`` with S the (V, V)
sparse part of the Gibbs kernel (V·k stored entries) and E = exp(h − max) a (V, N) block:
an SpMM. This times, in one run and on the same symmetrized random-neighbour operator
as ``regularizers.py`` (k = 32, about 64 entries per row after symmetrization):

* ``full_kl`` forward + backward on (N, V) logits (the baseline of every target),
* vocabmetric's fused log-kernel (``SparseLogKernel.fused``: the exp, the SpMM with
  software prefetch, the log and the log-domain fallback; token-major (V, N) in and out),
* ``torch.sparse.mm`` of the same S in CSR with a (V, N) dense block: MKL's SpMM, the
  linear product alone (no exp, no log, no transposes) — what a tuned library does with
  the gather-bound part,
* and the gathered torch path (any device).

It bounds what the CPU allows: a full Sinkhorn iteration is two such applications.

With ``--device cuda`` the same on a GPU: the Triton kernel (``SparseLogKernel.triton``,
exact log domain) at its default tile (and, with ``--sweep``, at 18 other shapes: positions
per program, entries per tile, warps; the default was chosen so), cuSPARSE's SpMM (``torch.sparse.mm``, the product alone) and the gathered
torch path; times between ``torch.cuda.synchronize()`` calls.

    .venv/bin/python benchmarks/sparse_kernel.py              # V = 100277, N = 64
    .venv/bin/python benchmarks/sparse_kernel.py --vocab 50257 --positions 64 256
    python benchmarks/sparse_kernel.py --device cuda --positions 64 1024 8192 --name sparse_kernel_cuda
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402
from regularizers import git_state, peaky_logits, random_neighbour_operator  # noqa: E402

from vocabmetric.regularizers import full_kl  # noqa: E402
from vocabmetric.regularizers.sinkhorn import SparseLogKernel  # noqa: E402


def best_of(fn, repeats: int, cuda: bool = False) -> float:
    fn()  # warm-up: numba/Triton compilation, per-ε tables
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


#: (positions per program, entries per tile, warps) shapes of the Triton kernel timed beside its default
TRITON_SHAPES = tuple((b, t, w) for b in (32, 64, 128) for t in (16, 32, 64) for w in (4, 8))


def run(vocab_size: int, n: int, eps: float, repeats: int, device: str = "cpu", sweep: bool = False) -> list[dict]:
    op = random_neighbour_operator(vocab_size).symmetrized()
    kernel = SparseLogKernel(op, device, torch.float32)
    logits, ref = (t.to(device) for t in peaky_logits(n, vocab_size))
    h = torch.log_softmax(logits, -1).t().contiguous()  # token-major (V, n), as the solver keeps it
    z = logits.clone().requires_grad_()

    def kl():
        z.grad = None
        full_kl(z, ref).sum().backward()

    indptr, nbr, _ = kernel.csr
    _, weights = kernel.csr_weights(eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        S = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(nbr).long(),
                                    torch.from_numpy(weights), size=(vocab_size, vocab_size), device=device)
    E = torch.rand(vocab_size, n, device=device)
    cuda = device.startswith("cuda")
    cases = {"full_kl forward+backward": kl}
    if cuda:
        from vocabmetric.regularizers.sinkhorn import triton_kernels as _triton

        cases["Triton log-kernel (vocabmetric, GPU)"] = lambda: kernel.triton(h, eps)
        h_t = _triton.padded_rows(h)
        dense = torch.logsumexp(h, 0)
        tables = kernel.csr_tensors(eps)
        for block, tile, warps in TRITON_SHAPES if sweep else ():
            cases[f"Triton kernel alone, {block} positions x {tile} entries, {warps} warps"] = (
                lambda b=block, t=tile, w=warps: _triton.sparse_lse_kernel()(h_t, *tables, dense, block=b, tile=t, warps=w))
        cases[f"Triton kernel alone, default {_triton.BLOCK_ROWS} x {_triton.TILE}, {_triton.WARPS} warps"] = (
            lambda: _triton.sparse_lse_kernel()(h_t, *tables, dense))
        out = torch.empty_like(h.t())
        cases["Triton kernel alone, default, writing (N, V) position-major"] = (
            lambda: _triton.sparse_lse_kernel()(h_t, *tables, dense, out.t()))
    else:
        cases["fused log-kernel (vocabmetric, CPU)"] = lambda: kernel.fused(h, eps)
    cases[f"torch.sparse.mm CSR x dense ({'cuSPARSE' if cuda else 'MKL'}), product only"] = lambda: torch.sparse.mm(S, E)
    if not cuda or n * vocab_size * kernel.width * 4 < 2**34:  # its (n, V, width) block: 94 GB at N = 8192
        cases["gathered log-kernel (torch path, any device)"] = lambda: kernel.gathered(h, eps)
    base = None
    rows = []
    for name, fn in cases.items():
        seconds = best_of(fn, repeats, cuda)
        base = base or seconds
        rows.append({"V": vocab_size, "N": n, "case": name, "seconds": seconds, "ratio_to_full_kl": seconds / base,
                     "stored_entries": int(len(nbr))})
        print(rows[-1], flush=True)
    kernel.release()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=[100277])
    parser.add_argument("--positions", type=int, nargs="*", default=[64])
    parser.add_argument("--eps", type=float, default=0.1, help="ε of the kernel (cap = 1.5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--name", default="sparse_kernel", help="results file name")
    parser.add_argument("--sweep", action="store_true", help="GPU: time the Triton kernel at every shape of TRITON_SHAPES")
    args = parser.parse_args(argv)
    rows = [row for v in args.vocab for n in args.positions
            for row in run(v, n, args.eps, args.repeats, args.device, args.sweep)]
    payload = {"name": args.name, "machine": machine_info(args.device), "git": git_state(), "device": args.device,
               "torch_threads": torch.get_num_threads(), "rows": rows}
    gpu = payload["machine"].get("gpu")
    lines = [f"# One Sinkhorn kernel application beside {'cuSPARSE' if gpu else 'MKL'}'s SpMM and full_kl "
             f"({'GPU' if gpu else 'CPU'})", "",
             f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, "
             f"{'GPU ' + gpu if gpu else str(payload['torch_threads']) + ' threads'}; commit "
             f"{payload['git']['commit'][:10]}. Best of "
             f"{args.repeats} after a warm-up; ratios are to full_kl forward+backward in the same run.", "",
             "| V | N | stored entries | case | time (s) | × full_kl |", "|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['V']} | {r['N']} | {r['stored_entries']} | {r['case']} | {r['seconds']:.4f} | "
              f"{r['ratio_to_full_kl']:.2f} |" for r in rows]
    write_results(args.name, payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
