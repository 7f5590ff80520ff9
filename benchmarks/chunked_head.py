"""lm_head_penalty (chunked through the LM head) against the plain path: peak memory and time.

One training step's penalty term, forward + backward, from the policy's last hidden states
``h (N, d)`` and LM head ``W (V, d)`` (both with grad) against a reference model's hidden
states and head (no grad), the mean over positions:

* ``chunked``: ``lm_head_penalty(penalty, h, W, ref_hidden=h_ref, ref_weight=W_ref)``;
* ``plain``:   ``logits = (h @ W.T).float()``; ``ref = (h_ref @ W_ref.T).float()`` under
  ``no_grad``; ``penalty(logits, ref).mean().backward()`` — today's path (the TRL adapter's).

for ``full_kl``, ``TreeWasserstein`` (a balanced random 16-way tree, as in
``benchmarks/regularizers.py``) and support-mode ``SinkhornDivergence`` (m = 64, tol 1e-4,
on a random-neighbour operator, k = 32). Inputs: peaky logits — each position's hidden state
points at 4 random tokens' head rows, so a few tokens hold most of the mass, as an LLM's —
and a reference 0.1 away in hidden space and 0.02 in the head.

CPU: every (penalty, method) runs in its own subprocess; peak memory is the process's
high-water RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` once the inputs exist and
one small warm-up step ran), reported as *extra* (beyond the RSS at the reset) and *total*;
the subprocesses run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that freed buffers leave RSS
at once, for both methods alike. Time: one more subprocess per penalty alternates the two
methods on the same inputs after a warm-up step each; the median step. With ``--device
cuda`` all of it runs in this process: memory is ``torch.cuda.max_memory_allocated`` above
the level before the step, time is between synchronizations. Target: chunked peak ≤ 1/3
of plain at N = 8,192.

    .venv/bin/python benchmarks/chunked_head.py                      # N 8192, V 49152, d 576 (SmolLM2-135M)
    .venv/bin/python benchmarks/chunked_head.py --positions 1024 --only full_kl
    python benchmarks/chunked_head.py --device cuda --dtype bfloat16 --vocab 151936 --width 1536 --name chunked_head_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

PENALTIES = ("full_kl", "tree", "sinkhorn support m=64")
METHODS = ("chunked", "plain")
# fp32 (N, V) tensors the plain path holds at its peak (logits, reference, gradient, and
# the penalty's own), to skip a case that cannot fit on this machine
PLAIN_TENSORS = 5


def make_penalty(name: str, vocab_size: int):
    from regularizers import balanced_tree, random_neighbour_operator

    from vocabmetric.regularizers import SinkhornDivergence, TreeWasserstein, full_kl

    if name == "full_kl":
        return full_kl
    if name == "tree":
        return TreeWasserstein(balanced_tree(vocab_size))
    if name == "sinkhorn support m=64":
        return SinkhornDivergence(random_neighbour_operator(vocab_size), eps=0.1, support=64, tol=1e-4)
    raise SystemExit(f"unknown penalty {name!r}; choose from {PENALTIES}")


def head_inputs(n: int, vocab_size: int, width: int, device: str, dtype: str, seed: int = 0):
    """``h, W`` with grad and ``h_ref, W_ref`` without, in ``dtype`` on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab_size, width, generator=g) * (3 / width**0.5)  # rows of norm ≈ 3
    targets = torch.randint(0, vocab_size, (n, 4), generator=g)
    hidden = 1.5 * weight[targets].sum(1) + 0.5 * torch.randn(n, width, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(n, width, generator=g)
    ref_weight = weight + 0.02 * torch.randn(vocab_size, width, generator=g) / width**0.5
    cast = lambda t: t.to(device=device, dtype=getattr(torch, dtype))  # noqa: E731
    return cast(hidden).requires_grad_(), cast(weight).requires_grad_(), cast(ref_hidden), cast(ref_weight)


def step(method: str, penalty, inputs, chunk_size: int | None = None) -> float:
    import torch

    from vocabmetric.regularizers import lm_head_penalty

    hidden, weight, ref_hidden, ref_weight = inputs
    if method == "chunked":
        loss = lm_head_penalty(penalty, hidden, weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               chunk_size=chunk_size)
    else:
        logits = (hidden @ weight.T).float()
        with torch.no_grad():
            ref = (ref_hidden @ ref_weight.T).float()
        loss = penalty(logits, ref).mean()
    loss.backward()
    return float(loss.detach())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_case_cpu(args) -> dict:
    """One subprocess, one (penalty, method): inputs, a warm-up on 8 positions, then one step."""
    inputs = head_inputs(args.positions, args.vocab, args.width, "cpu", args.dtype, args.seed)
    penalty = make_penalty(args.penalty, args.vocab)
    few = (inputs[0][:8].detach().requires_grad_(), inputs[1], inputs[2][:8], inputs[3])
    step(args.method, penalty, few, args.chunk_size)  # warm-up: numba compiled, tables built
    inputs[1].grad = None
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base_kib, how = _status_kib("VmRSS"), "VmHWM after clear_refs"
    except OSError:
        base_kib, how = _status_kib("VmRSS"), "ru_maxrss (no clear_refs: the peak may predate the step)"
    value = step(args.method, penalty, inputs, args.chunk_size)
    peak_kib = _status_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"value": value, "extra_mb": (peak_kib - base_kib) / 1024, "total_mb": peak_kib / 1024, "how": how}


def timing_case_cpu(args) -> dict:
    """One subprocess, both methods on the same inputs, alternating; one warm-up step each."""
    inputs = head_inputs(args.positions, args.vocab, args.width, "cpu", args.dtype, args.seed)
    penalty = make_penalty(args.penalty, args.vocab)
    times = {method: [] for method in METHODS}
    for rep in range(args.reps + 1):
        for method in METHODS:
            for t in inputs[:2]:
                t.grad = None
            start = time.perf_counter()
            step(method, penalty, inputs, args.chunk_size)
            if rep:
                times[method].append(time.perf_counter() - start)
    return {"times_s": times}


def _subprocess(args, *extra: str) -> dict:
    command = [sys.executable, __file__, "--positions", str(args.positions), "--vocab", str(args.vocab),
               "--width", str(args.width), "--dtype", args.dtype, "--seed", str(args.seed), "--reps", str(args.reps),
               *(["--chunk-size", str(args.chunk_size)] if args.chunk_size else []), *extra]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def compare_cpu(args, names) -> list[dict]:
    rows = []
    nv4_mb = args.positions * args.vocab * 4 / 2**20
    for name in names:
        row = {"penalty": name, "nv4_mb": nv4_mb}
        if (PLAIN_TENSORS + 1) * nv4_mb > 0.9 * _mem_available_mb():
            row["skipped"] = f"the plain path needs ~{(PLAIN_TENSORS + 1) * nv4_mb:.0f} MB; not available"
            rows.append(row)
            continue
        for method in METHODS:
            row[method] = _subprocess(args, "--memory", name, method)
        row["times_s"] = _subprocess(args, "--timing", name)["times_s"]
        record(rows, row, args)
    return rows


def run_gpu(args, names) -> list[dict]:
    import torch

    rows = []
    for name in names:
        penalty = make_penalty(name, args.vocab)
        row = {"penalty": name, "nv4_mb": args.positions * args.vocab * 4 / 2**20, "times_s": {}}
        for method in METHODS:
            inputs = head_inputs(args.positions, args.vocab, args.width, "cuda", args.dtype, args.seed)
            step(method, penalty, inputs, args.chunk_size)  # warm-up: kernels compiled, tables built
            inputs[0].grad = inputs[1].grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            value = step(method, penalty, inputs, args.chunk_size)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            row[method] = {"value": value, "extra_mb": (peak - base) / 2**20, "total_mb": peak / 2**20,
                           "how": "torch.cuda.max_memory_allocated"}
            times = []
            for _ in range(args.reps):
                inputs[0].grad = inputs[1].grad = None
                torch.cuda.synchronize()
                start = time.perf_counter()
                step(method, penalty, inputs, args.chunk_size)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row["times_s"][method] = times
            del inputs
            torch.cuda.empty_cache()
        record(rows, row, args)
    return rows


def record(rows: list[dict], row: dict, args) -> None:
    """Finish ``row``, append it, say it on stderr and hand the rows to ``args.on_row`` (if any)."""
    finish_row(row)
    rows.append(row)
    print(summary_line(row), file=sys.stderr)
    if getattr(args, "on_row", None):
        args.on_row(rows)


def finish_row(row: dict) -> None:
    for method in METHODS:
        row[f"{method}_s"] = statistics.median(row["times_s"][method])
    row["memory_ratio"] = row["chunked"]["extra_mb"] / max(row["plain"]["extra_mb"], 1e-9)
    row["total_ratio"] = row["chunked"]["total_mb"] / max(row["plain"]["total_mb"], 1e-9)
    row["time_ratio"] = row["chunked_s"] / row["plain_s"]
    plain = row["plain"]["value"]
    row["value_rel_diff"] = abs(row["chunked"]["value"] - plain) / max(abs(plain), 1e-30)


def summary_line(row: dict) -> str:
    return (f"{row['penalty']}: peak extra {row['chunked']['extra_mb']:.0f} vs {row['plain']['extra_mb']:.0f} MB "
            f"({row['memory_ratio']:.3f}), time {row['chunked_s']:.2f} vs {row['plain_s']:.2f} s "
            f"({row['time_ratio']:.2f})")


def to_markdown(rows: list[dict], args, machine: dict) -> str:
    where = (f"GPU ({machine.get('gpu', '?')})" if args.device == "cuda" else
             f"CPU ({machine['cpu']}, {machine['cores']} cores shared with other processes; load "
             f"{machine.get('load', '?')})")
    lines = [
        f"One penalty step (forward + backward, mean over positions) from hidden states: N = {args.positions:,}, "
        f"V = {args.vocab:,}, d = {args.width}, {args.dtype} hidden states and heads, on {where}. "
        "`chunked`: `lm_head_penalty` with the reference from its hidden states and head; `plain`: "
        "`penalty((h @ W.T).float(), (h_ref @ W_ref.T).float()).mean().backward()`. Peak: extra = "
        "above the level once the inputs exist; total = the process's (CPU: RSS high-water mark, "
        "torch and the inputs included). Time: median of "
        f"{args.reps} step(s) after a warm-up, the two methods alternating. Target: chunked peak ≤ 1/3 of plain.",
        "",
        "| penalty | N·V·4 (MB) | chunked peak extra (MB) | plain peak extra (MB) | extra chunked/plain "
        "| total chunked/plain (MB) | chunked (s) | plain (s) | time chunked/plain | rel. diff of value |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['penalty']} | {r['nv4_mb']:.0f} | skipped: {r['skipped']} ||||||||")
            continue
        lines.append(
            f"| {r['penalty']} | {r['nv4_mb']:.0f} | {r['chunked']['extra_mb']:.0f} | {r['plain']['extra_mb']:.0f} "
            f"| **{r['memory_ratio']:.3f}** | {r['chunked']['total_mb']:.0f} / {r['plain']['total_mb']:.0f} "
            f"({r['total_ratio']:.2f}) | {r['chunked_s']:.2f} | {r['plain_s']:.2f} | {r['time_ratio']:.2f} "
            f"| {r['value_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="+", default=list(PENALTIES), choices=PENALTIES)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default chunked_head[_cuda])")
    parser.add_argument("--memory", nargs=2, metavar=("PENALTY", "METHOD"))
    parser.add_argument("--timing", metavar="PENALTY")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.memory:
        args.penalty, args.method = args.memory
        print(json.dumps(memory_case_cpu(args)))
        return
    if args.timing:
        args.penalty = args.timing
        print(json.dumps(timing_case_cpu(args)))
        return

    from _machine import machine_info, write_results

    name = args.name or ("chunked_head_cuda" if args.device == "cuda" else "chunked_head")

    def write(rows):
        machine = dict(machine_info(args.device), load=", ".join(f"{x:.1f}" for x in os.getloadavg()))
        payload = {"positions": args.positions, "vocab": args.vocab, "width": args.width, "dtype": args.dtype,
                   "device": args.device, "reps": args.reps, "chunk_size": args.chunk_size, "rows": rows,
                   "machine": machine}
        table = to_markdown(rows, args, machine)
        return write_results(name, payload, table), table

    args.on_row = write
    rows = run_gpu(args, args.only) if args.device == "cuda" else compare_cpu(args, args.only)
    path, table = write(rows)
    print(table, f"\nwritten {path}")


if __name__ == "__main__":
    main()
