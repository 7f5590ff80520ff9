"""full_kl against the plain two-log_softmax expression: time and extra peak memory.

For policy logits ``z`` (with grad) and reference logits ``r``, both ``[N, V]`` float32,
one step is the reverse KL per position, summed, and its backward pass:

* ``full_kl``: ``vocabmetric.regularizers.full_kl(z, r)`` (chunked, custom backward);
* ``plain``:   ``logp, logq = log_softmax(z), log_softmax(r)``;
  ``(logp.exp() * (logp - logq)).sum(-1)`` — what a trainer writes by hand.

Each (V, N, method) runs in its own subprocess so that peak memory is that case's alone:
``extra`` = peak RSS (``ru_maxrss``) − RSS once the inputs exist − the gradient ``N·V·4``
bytes, reported as a multiple of ``N·V·4``. Target: full_kl ≤ 1.2, at no more time than
plain. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that glibc returns
every freed buffer of 1 MiB or more to the system at once: RSS then tracks the tensors that
are alive, for both methods alike (glibc's default threshold adapts upward to 32 MiB and
keeps freed chunk buffers cached, which RSS would count). Time is measured in one more
subprocess per case holding both methods on the same inputs, alternating step by step
(full_kl, plain, full_kl, …) so that load from other processes hits both alike; the time
is each method's median step. Torch runs with 1 and with 2 intra-op threads: on a shared,
oversubscribed machine the many small parallel regions of a chunked loop wait for the
other thread, so the 1-thread rows measure the algorithm more reliably. When CUDA is available, the same comparison runs on the GPU in
float32 and bfloat16 with ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/full_kl.py                     # N ∈ {1024, 2048} (CPU default)
    .venv/bin/python benchmarks/full_kl.py --sizes 1024 8192   # needs ~25 GB free at V=100277
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

VOCABS = (50257, 100277)
METHODS = ("full_kl", "plain")
# fp32 [N, V] tensors that the plain expression holds at its peak beyond inputs and grad
# (logp, logq, p, logp − logq, the product), used only to skip cases that cannot fit.
PLAIN_TENSORS = 5


def _step(method: str, logits, ref_logits):
    import torch

    from vocabmetric.regularizers import full_kl

    if method == "full_kl":
        kl = full_kl(logits, ref_logits)
    else:
        logp = torch.log_softmax(logits, -1)
        logq = torch.log_softmax(ref_logits, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    total = kl.sum()
    total.backward()
    return float(total.detach())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(vocab_size: int, n_positions: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n_positions, vocab_size, generator=generator)).requires_grad_()
    ref_logits = 3 * torch.randn(n_positions, vocab_size, generator=generator)
    return logits, ref_logits


def memory_case_cpu(method: str, vocab_size: int, n_positions: int, seed: int) -> dict:
    """One subprocess, one method: inputs, then one step; peak RSS beyond inputs and grad."""
    logits, ref_logits = _inputs(vocab_size, n_positions, seed)
    base = _rss_bytes()
    checksum = _step(method, logits, ref_logits)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    grad_bytes = logits.grad.numel() * logits.grad.element_size()
    return {"method": method, "checksum": checksum, "extra_bytes": peak - base - grad_bytes}


def timing_case_cpu(vocab_size: int, n_positions: int, reps: int, seed: int, threads: int) -> dict:
    """One subprocess, both methods on the same inputs, alternating; one warm-up step each."""
    import torch

    torch.set_num_threads(threads)
    logits, ref_logits = _inputs(vocab_size, n_positions, seed)
    times = {method: [] for method in METHODS}
    for rep in range(reps + 1):
        for method in METHODS:
            logits.grad = None
            start = time.perf_counter()
            _step(method, logits, ref_logits)
            if rep:  # the first round warms up both
                times[method].append(time.perf_counter() - start)
    return {"times_s": times, "threads": torch.get_num_threads()}


def run_gpu(vocab_sizes, sizes, reps: int) -> list[dict]:
    """The same comparison on CUDA, float32 and bfloat16 inputs (KL accumulated in fp32)."""
    import torch

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for vocab_size in vocab_sizes:
            for n_positions in sizes:
                for method in METHODS:
                    torch.cuda.empty_cache()
                    logits = (3 * torch.randn(n_positions, vocab_size, device="cuda")).to(dtype)
                    logits.requires_grad_()
                    ref_logits = (3 * torch.randn(n_positions, vocab_size, device="cuda")).to(dtype)
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    checksum = _step(method, logits, ref_logits)
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated()
                    grad_bytes = logits.grad.numel() * logits.grad.element_size()
                    times = []
                    for _ in range(reps):
                        logits.grad = None
                        begin, end = torch.cuda.Event(True), torch.cuda.Event(True)
                        begin.record()
                        _step(method, logits, ref_logits)
                        end.record()
                        torch.cuda.synchronize()
                        times.append(begin.elapsed_time(end) / 1000)
                    rows.append({
                        "device": "cuda", "dtype": str(dtype).replace("torch.", ""),
                        "method": method, "V": vocab_size, "N": n_positions,
                        "median_s": statistics.median(times), "checksum": checksum,
                        "extra_bytes": peak - base - grad_bytes,
                        "nv4_bytes": n_positions * vocab_size * 4,
                    })
                    del logits, ref_logits
    return rows


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _subprocess(*arguments: str) -> dict:
    command = [sys.executable, __file__, *arguments]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_cpu(vocab_sizes, sizes, reps: int, thread_counts, seed: int, on_row=None) -> list[dict]:
    """One row per (threads, V, N): both methods side by side, with ratios full_kl / plain.

    Memory is measured once per (V, N) (it does not depend on the thread count).
    ``on_row(rows)`` is called after each row (the script writes its results there, so a
    run cut short keeps the rows it finished).
    """
    rows, memory = [], {}
    for threads, vocab_size, n_positions in itertools.product(thread_counts, vocab_sizes, sizes):
        nv4 = n_positions * vocab_size * 4
        row = {"threads": threads, "V": vocab_size, "N": n_positions, "nv4_mb": nv4 / 2**20}
        if (3 + PLAIN_TENSORS) * nv4 > 0.9 * _mem_available_bytes():
            row["skipped"] = "the plain expression does not fit in the memory available"
            rows.append(row)
            continue
        case = (str(vocab_size), str(n_positions), "--seed", str(seed))
        if (vocab_size, n_positions) not in memory:
            memory[vocab_size, n_positions] = {
                method: _subprocess("--memory", method, *case) for method in METHODS}
        timing = _subprocess("--timing", *case, "--reps", str(reps), "--threads", str(threads))
        for method in METHODS:
            row[f"{method}_s"] = statistics.median(timing["times_s"][method])
            row[f"{method}_times_s"] = timing["times_s"][method]
            row[f"{method}_extra"] = memory[vocab_size, n_positions][method]["extra_bytes"] / nv4
        row["time_ratio"] = row["full_kl_s"] / row["plain_s"]
        row["memory_ratio"] = row["full_kl_extra"] / max(row["plain_extra"], 1e-9)
        sums = [memory[vocab_size, n_positions][method]["checksum"] for method in METHODS]
        row["checksum_rel_diff"] = abs(sums[0] - sums[1]) / abs(sums[1])
        print(f"threads={threads} V={vocab_size} N={n_positions}: time ratio {row['time_ratio']:.2f}, "
              f"extra memory {row['full_kl_extra']:.2f} vs {row['plain_extra']:.2f} ×NV4", file=sys.stderr)
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def to_markdown(rows: list[dict], gpu_rows: list[dict], machine: dict, reps: int) -> str:
    lines = [
        f"Reverse KL per position, forward + backward, float32 on CPU ({machine['cpu']}, "
        f"{machine['cores']} cores shared with other processes: timings are noisy, compare ratios). "
        f"Time: median of {reps} steps, the two methods alternating in one process after a "
        "warm-up step each. "
        "Extra memory: peak RSS beyond inputs and gradient, in units of N·V·4 bytes "
        "(target for full_kl ≤ 1.2).",
        "",
        "| threads | V | N | N·V·4 (MB) | full_kl (s) | plain (s) | time full/plain | full_kl extra (×NV4) "
        "| plain extra (×NV4) | memory full/plain | rel. diff of ΣKL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "—"

    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['V']} | {r['N']} | {r['nv4_mb']:.0f} | {cell(r, 'full_kl_s', '.3f')} "
            f"| {cell(r, 'plain_s', '.3f')} | {cell(r, 'time_ratio', '.2f')} "
            f"| {cell(r, 'full_kl_extra', '.2f')} | {cell(r, 'plain_extra', '.2f')} "
            f"| {cell(r, 'memory_ratio', '.2f')} | {cell(r, 'checksum_rel_diff', '.1e')} |"
        )
    if gpu_rows:
        lines += ["", f"GPU ({machine.get('gpu', '?')}):", "",
                  "| dtype | V | N | method | time (s) | extra (×NV4) |", "|---|---|---|---|---|---|"]
        for r in gpu_rows:
            lines.append(f"| {r['dtype']} | {r['V']} | {r['N']} | {r['method']} | {r['median_s']:.4f} "
                         f"| {r['extra_bytes'] / r['nv4_bytes']:.2f} |")
    else:
        lines += ["", "GPU part not run: no CUDA device on this machine."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", nargs=3, metavar=("METHOD", "V", "N"))
    parser.add_argument("--timing", nargs=2, metavar=("V", "N"))
    args = parser.parse_args()
    if args.memory:
        method, vocab_size, n_positions = args.memory
        print(json.dumps(memory_case_cpu(method, int(vocab_size), int(n_positions), args.seed)))
        return
    if args.timing:
        vocab_size, n_positions = map(int, args.timing)
        print(json.dumps(timing_case_cpu(vocab_size, n_positions, args.reps, args.seed, args.threads[0])))
        return

    import torch
    from _machine import machine_info, write_results

    def write(rows, gpu_rows=()):
        machine = machine_info("cuda" if gpu_rows else "cpu")
        payload = {"sizes": args.sizes, "threads": args.threads, "vocabs": args.vocabs,
                   "reps": args.reps, "cpu": rows, "gpu": list(gpu_rows),
                   "machine": machine}
        table = to_markdown(rows, list(gpu_rows), machine, args.reps)
        return write_results("full_kl", payload, table), table

    rows = compare_cpu(args.vocabs, args.sizes, args.reps, args.threads, args.seed, on_row=write)
    gpu_rows = run_gpu(args.vocabs, [1024, 8192], args.reps) if torch.cuda.is_available() else []
    path, table = write(rows, gpu_rows)
    print(table, f"\nwritten {path}")


if __name__ == "__main__":
    main()
