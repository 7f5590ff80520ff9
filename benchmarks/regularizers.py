"""Forward+backward time and peak memory of every regularizer beside ``full_kl``, in one run.

For V ∈ {50257, 100277, 200019} and N ∈ {64, 1024} positions, on synthetic but realistic
inputs — peaky policy logits (a few tokens far above a Gaussian background, as an LLM's)
and a reference close to them; unit embeddings in clusters; a balanced random tree
(branching 16, tokens as leaves, like TreeBuilder's) and two CostOperators with k = 32:
the pipeline's kNN metric over those embeddings (``KnnMetric``, faiss; symmetrized by
Sinkhorn to 46 entries a row on average) and a random-neighbour graph (symmetrized to up
to 64), the worst case for the full-vocabulary kernel, which then has no locality to use
— it times, side by side:

* ``full_kl`` (the baseline: every other row is reported as a ratio to it),
* ``TreeWasserstein``, ``SlicedWasserstein`` with L = 16 and 64,
* ``SinkhornDivergence`` in support mode (m = 64, tol 1e-4) and on the full vocabulary
  (to convergence, tol 1e-4; and exactly 10 iterations at ε, for the cost per iteration
  = time / iterations where converging takes minutes),
* the converged full-vocabulary rows at ε = cap/15, tol 1e-4, with the heavy-token
  block-Newton acceleration (``acceleration="newton"``): **cold** (every call from the ε
  schedule) and **warm** (``warm_start=True``; each timed call's logits and reference
  differ from the previous call's by a drift of 0.05 per logit, about a training step's
  change, so the start is the last call's solution, not this one's).

An iteration updates both potentials of a problem: the pair OT(p, q), or the two
symmetric problems OT(p, p) and OT(q, q) stacked; either way a sparse kernel over 2N rows.

Time is the best of ``--repeats`` wall-clock runs after a warm-up (one run where the warm-up
took over 30 s); memory is the peak RSS
above the level before the call, sampled every 2 ms (it includes the gradient tensor and
anything saved for backward; not the inputs). CPU timings on a shared machine are noisy: read the ratios.
With ``--device cuda`` (N ∈ {64, 1024, 8192} by default, nothing skipped) time is taken
between ``torch.cuda.synchronize()`` calls and memory is the allocator's peak above the level
before the call; ``--dtype bfloat16`` feeds bf16 logits (every regularizer computes in float32).

    .venv/bin/python benchmarks/regularizers.py                # writes results/regularizers.{json,md}
    .venv/bin/python benchmarks/regularizers.py --quick        # V = 50257 only, N = 64
    .venv/bin/python benchmarks/regularizers.py --vocab 100277 --positions 64 \
        --only "sinkhorn full (10 iterations), kNN" --name sinkhorn_full_iteration   # one row, own file
    python benchmarks/regularizers.py --device cuda --dtype bfloat16 --name regularizers_cuda_bf16
    .venv/bin/python benchmarks/regularizers.py --vocab 100277 --positions 64 256 --merge \
        --only "sinkhorn full newton ε=cap/15 (cold), kNN" "sinkhorn full newton ε=cap/15 (warm), kNN"
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402

from vocabmetric.metrics import KnnMetric  # noqa: E402
from vocabmetric.cost import CostOperator, TreeMetric  # noqa: E402
from vocabmetric.regularizers import SinkhornDivergence, SlicedWasserstein, TreeWasserstein, full_kl  # noqa: E402

VOCAB_SIZES = (50257, 100277, 200019)
POSITIONS = (64, 1024)
GPU_POSITIONS = (64, 1024, 8192)
# Cases whose one run would take minutes on 2 shared cores: skipped and said so.
# (name, V or None for any, N)
SKIP = {}
for _graph in ("kNN", "random graph"):
    SKIP[(f"sinkhorn full (converged), {_graph}", None, 1024)] = (
        "skipped for time: O(N·V·k) per iteration × ~100 iterations")
    SKIP[(f"sinkhorn full (converged), {_graph}", 200019, 64)] = (
        "skipped for time (minutes on 2 shared cores); see V=100277")
    SKIP[(f"sinkhorn full (10 iterations), {_graph}", 200019, 1024)] = "skipped for time: see V = 100277"


def _skip(name: str, vocab_size: int, n: int, device: str = "cpu") -> str | None:
    if device != "cpu":
        return None
    return SKIP.get((name, vocab_size, n)) or SKIP.get((name, None, n))


# -- inputs ------------------------------------------------------------------------------------
def clustered_embeddings(vocab_size: int, dim: int = 32, clusters: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    emb = centers[rng.integers(0, clusters, vocab_size)] + 0.5 * rng.standard_normal((vocab_size, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def balanced_tree(vocab_size: int, branching: int = 16, seed: int = 0) -> TreeMetric:
    """Tokens are nodes 0..V-1 (leaves); internal nodes group ``branching`` children each."""
    rng = np.random.default_rng(seed)
    parent = np.full(2 * vocab_size + 1, -1, dtype=np.int64)  # n_nodes < 2V for branching >= 2
    level, next_id = rng.permutation(vocab_size), vocab_size
    while len(level) > 1:
        groups = np.arange(len(level)) // branching
        parent[level] = next_id + groups
        level = np.arange(next_id, next_id + groups[-1] + 1)
        next_id += int(groups[-1]) + 1
    parent = parent[:next_id]
    return TreeMetric(parent, rng.uniform(0.05, 0.5, next_id), np.arange(vocab_size))


def knn_operator(embeddings: np.ndarray, k: int = 32) -> CostOperator:
    """The pipeline's kNN metric (exact faiss search) over ``embeddings``: neighbours in clusters."""
    return KnnMetric(k=k, progress=False).fit(embeddings).to_operator()


def random_neighbour_operator(vocab_size: int, k: int = 32, seed: int = 0) -> CostOperator:
    rng = np.random.default_rng(seed)
    offsets = rng.choice(np.arange(1, vocab_size), size=(vocab_size, k))
    offsets.sort(axis=1)
    dup = np.zeros_like(offsets, dtype=bool)
    dup[:, 1:] = offsets[:, 1:] == offsets[:, :-1]
    indices = np.where(dup, -1, (np.arange(vocab_size)[:, None] + offsets) % vocab_size)
    costs = rng.uniform(0.2, 1.0, (vocab_size, k))
    return CostOperator(indices, costs, cap=1.5)


def peaky_logits(n: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab_size, generator=g) * 2
    spikes = torch.randint(0, vocab_size, (n, 8), generator=g)
    logits.scatter_add_(1, spikes, 12 + 4 * torch.rand(n, 8, generator=g))
    ref = logits + 0.5 * torch.randn(n, vocab_size, generator=g)
    return logits, ref


# -- measurement -------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra_mb = (self.peak - self.base) / 2**20


class PeakCUDA:
    """Peak CUDA allocator memory above the level at entry (synchronized at both ends)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.extra_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def measure(fn, logits, ref, repeats: int) -> dict:
    z = logits.clone().requires_grad_()
    peak = PeakCUDA if z.device.type == "cuda" else PeakRSS

    def once():
        fn(z, ref).sum().backward()

    start = time.perf_counter()
    once()  # warm-up: numba compilation, operator tables, symmetric solves cached
    if time.perf_counter() - start > 30:  # a run of minutes: its noise is small beside it
        repeats = 1
    times, extra = [], 0.0
    for _ in range(repeats):
        z.grad = None  # the gradient the call allocates counts in its peak
        with peak() as mem:  # synchronizes a GPU at both ends, so the time is the work's
            start = time.perf_counter()
            once()
            if z.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        extra = max(extra, mem.extra_mb)
    return {"seconds": min(times), "peak_extra_mb": extra}


def regularizers(vocab_size: int):
    emb = clustered_embeddings(vocab_size)
    tree = balanced_tree(vocab_size)
    knn, random = knn_operator(emb), random_neighbour_operator(vocab_size)
    regs = {
        "full_kl": full_kl,
        "tree": TreeWasserstein(tree),
        "sliced L=16": SlicedWasserstein(emb, n_projections=16),
        "sliced L=64": SlicedWasserstein(emb, n_projections=64),
        "sinkhorn support m=64": SinkhornDivergence(random, support=64, tol=1e-4, max_iter=100),
    }
    for graph, op in (("kNN", knn), ("random graph", random)):
        regs[f"sinkhorn full (converged), {graph}"] = SinkhornDivergence(op, tol=1e-4, max_iter=100)
        # exactly 10 iterations per problem at ε (no ε-scaling, a tolerance never met): the
        # per-iteration cost of the full-vocabulary mode at sizes where converging takes minutes
        regs[f"sinkhorn full (10 iterations), {graph}"] = SinkhornDivergence(op, tol=1e-30, max_iter=10, eps_scaling=0)
    eps = knn.cap / 15  # the converged rows of issue 18: heavy-token block Newton, cold and warm
    regs["sinkhorn full newton ε=cap/15 (cold), kNN"] = SinkhornDivergence(
        knn, eps=eps, tol=1e-4, max_iter=100, acceleration="newton")
    regs["sinkhorn full newton ε=cap/15 (warm), kNN"] = Drifting(SinkhornDivergence(
        knn, eps=eps, tol=1e-4, max_iter=100, acceleration="newton", warm_start=True))
    return regs


class Drifting:
    """``reg`` called on inputs that drift by ``step`` per logit between calls (a fixed
    random direction each for the logits and the reference): the warm-start case, where
    consecutive training steps' distributions are near but not equal."""

    def __init__(self, reg, step: float = 0.05, seed: int = 1):
        self.reg, self.step, self.seed, self.calls = reg, step, seed, 0
        self._directions: dict = {}

    @property
    def last_info(self) -> dict:
        return self.reg.last_info

    def directions(self, z):
        """The two drift directions, made once per shape on z's device (in the untimed
        warm-up call): drawn on the CPU and copied in every call, they had been timed with
        the solve (at N = 8,192, V = 100k: two 3.3 GB randn and copies per call, which made
        warm starts read slower than cold on the GPU)."""
        key = (tuple(z.shape), z.device, z.dtype)
        if key not in self._directions:
            g = torch.Generator().manual_seed(self.seed)
            self._directions = {key: tuple(torch.randn(z.shape, generator=g).to(z.device, z.dtype) for _ in range(2))}
        return self._directions[key]

    def __call__(self, z, ref):
        dz, dr = self.directions(z)
        self.calls += 1
        return self.reg(z + self.calls * self.step * dz, ref + self.calls * self.step * dr)


def git_state() -> dict:
    """The commit measured (``VOCABMETRIC_COMMIT`` where the copy has no .git, as on a
    device machine) and whether the regularizers had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]

    def run(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git
            return ""

    if os.environ.get("VOCABMETRIC_COMMIT"):  # a copy whose .git, if any, is not the tree's
        return {"commit": os.environ["VOCABMETRIC_COMMIT"], "uncommitted_regularizer_changes": ""}
    return {"commit": run("rev-parse", "HEAD") or "unknown",
            "uncommitted_regularizer_changes": run("status", "--porcelain", "vocabmetric/regularizers")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 50257 and N = 64 only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", type=int, nargs="*", default=None)
    parser.add_argument("--positions", type=int, nargs="*", default=None)
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these regularizers (full_kl, the baseline, always runs)")
    parser.add_argument("--name", default="regularizers", help="results file name (default: regularizers)")
    parser.add_argument("--malloc", choices=("release", "default"), default="release",
                        help="CPU only. release (default): glibc returns every block over 1 MB to the OS when freed, so "
                             "peak RSS per call is meaningful, but every large tensor page-faults anew and "
                             "full_kl runs 2-3x slower than in a plain process; default: glibc as a training "
                             "process has it (times as users see them; memory columns then read low)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results file's other rows: replace only the (V, N, regularizer) rows measured now")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the logits' dtype")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if argv is None and args.device == "cpu" and args.malloc == "release" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed threshold makes glibc return every large block to the OS when freed, so
        # RSS follows the live tensors and its peak per call is meaningful.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    vocab_sizes = args.vocab or ((50257,) if args.quick else VOCAB_SIZES)
    positions = args.positions or ((64,) if args.quick else GPU_POSITIONS if args.device != "cpu" else POSITIONS)
    meta = {"device": args.device, "dtype": args.dtype}
    kept = _previous_rows(args.name) if args.merge else []
    rows = []
    for vocab_size in vocab_sizes:
        regs = regularizers(vocab_size)
        for n in positions:
            logits, ref = (t.to(args.device, getattr(torch, args.dtype)) for t in peaky_logits(n, vocab_size))
            base = None
            for name, fn in regs.items():
                if args.only and name != "full_kl" and name not in args.only:
                    continue
                row = {"V": vocab_size, "N": n, "regularizer": name}
                if _skip(name, vocab_size, n, args.device):
                    rows.append({**row, "skipped": _skip(name, vocab_size, n, args.device)})
                    print(row, "skipped", flush=True)
                    continue
                result = measure(fn, logits, ref, args.repeats)
                info = getattr(fn, "last_info", {}) or {}
                if "iterations" in info:
                    result["iterations"] = info["iterations"]
                    result["seconds_per_iteration"] = result["seconds"] / max(info["iterations"], 1)
                if "marginal_error" in info:  # converged or not: the largest of the three problems'
                    result["marginal_error"] = max(info["marginal_error"], info.get("marginal_error_sym", 0.0))
                if name == "full_kl":
                    base = result
                result["time_ratio"] = result["seconds"] / base["seconds"]
                result["memory_ratio"] = result["peak_extra_mb"] / max(base["peak_extra_mb"], 1e-9)
                rows.append({**row, **result})
                print(rows[-1], flush=True)
                _write(_merged(kept, rows), args.name, meta)  # after every row, so an interrupted run keeps what it measured


def _previous_rows(name: str) -> list:
    import json

    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _merged(kept: list, rows: list) -> list:
    """``kept`` with the rows measured now in place of those of the same (V, N, regularizer);
    new ones appended. The full_kl baseline of a merged row is the one measured beside it."""
    key = lambda r: (r["V"], r["N"], r["regularizer"])  # noqa: E731
    old = {key(r) for r in kept}
    rows = [{**r, "regularizer": "full_kl (baseline of this run)"} if r["regularizer"] == "full_kl" and key(r) in old
            else r for r in rows]
    fresh = {key(r): r for r in rows}
    out = [fresh.pop(key(r), r) for r in kept]
    return out + list(fresh.values())


def _write(rows: list, name: str = "regularizers", meta: dict | None = None) -> None:
    meta = meta or {"device": "cpu", "dtype": "float32"}
    payload = {"name": name, "machine": machine_info(meta["device"]), "git": git_state(), **meta,
               "malloc": "release (MALLOC_MMAP_THRESHOLD_=1 MB)" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default",
               "torch_threads": torch.get_num_threads(), "rows": rows,
               "note": "CPU shared with other jobs: wall-clock times are noisy, compare the ratios "
                       "measured in the same run. Memory = peak RSS above the level before the call."}
    write_results(name, payload, table(rows, payload))


def table(rows: list, payload: dict) -> str:
    gpu = payload["machine"].get("gpu")
    where = (f"GPU: {gpu}, {payload.get('dtype', 'float32')} logits; memory is the CUDA allocator's peak above "
             "the level before the call" if gpu else
             f"{payload['torch_threads']} threads; malloc {payload.get('malloc', 'release (MALLOC_MMAP_THRESHOLD_=1 MB)')}")
    lines = [
        f"# Regularizers: forward+backward beside full_kl ({'GPU' if gpu else 'CPU'})", "",
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, torch "
        f"{payload['machine'].get('torch')}; {where}; commit "
        f"{payload['git']['commit'][:10]}{' (sinkhorn.py had uncommitted changes)' if payload['git']['uncommitted_regularizer_changes'] else ''}.",
        "Read the ratios (same run)." if gpu else
        "Shared machine: times are noisy, read the ratios (same run). Memory: peak RSS above the level before the call.", "",
        "| V | N | regularizer | time (s) | × full_kl | peak extra (MB) | × full_kl | iterations | per iteration, × full_kl | marginal error |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['V']} | {r['N']} | {r['regularizer']} | — | — | — | — | {r['skipped']} | | |")
            continue
        apps = r.get("iterations", "")
        per_app = f"{r['time_ratio'] / apps:.2f}" if apps else ""
        err = f"{r['marginal_error']:.1e}" if "marginal_error" in r else ""
        lines.append(
            f"| {r['V']} | {r['N']} | {r['regularizer']} | {r['seconds']:.3f} | {r['time_ratio']:.2f} | "
            f"{r['peak_extra_mb']:.0f} | {r['memory_ratio']:.2f} | {apps} | {per_app} | {err} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
