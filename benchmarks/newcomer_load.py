"""What a newcomer waits for on a real store: ``vocabmetric plot --kind costs`` and a Sinkhorn
penalty's load, this tree beside a baseline commit, in the same run.

Each measurement runs in a fresh subprocess, once with ``PYTHONPATH`` on this checkout and
once on the baseline commit's ``vocabmetric/`` (``git archive``, default 89e971a: before
issue 28), alternating:

* ``plot costs``: ``vocabmetric plot STORE --kind costs`` (every metric; l2 and tree sample
  the 16 nearest of 200 tokens), wall seconds;
* ``sinkhorn load``: ``regularizer_from_store(store, "sinkhorn", metric="knn", support=64)``,
  wall seconds and the process's peak RSS above its RSS after imports, then the same call a
  second time in that process.

    .venv/bin/python benchmarks/newcomer_load.py [--store runs/demo/metric.zarr] [--base 89e971a]
    # writes benchmarks/results/newcomer_load.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402

SINKHORN = """
import json, resource, sys, time
from vocabmetric import open_store
from vocabmetric.regularizers import regularizer_from_store
def rss_mb():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
base = rss_mb()
store = open_store(sys.argv[1])
t = time.perf_counter(); reg = regularizer_from_store(store, "sinkhorn", metric="knn", support=64); first = time.perf_counter() - t
t = time.perf_counter(); regularizer_from_store(store, "sinkhorn", metric="knn", support=64); second = time.perf_counter() - t
print(json.dumps({"first_s": first, "second_s": second, "width": reg.op.k,
                  "peak_extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
"""

#: The same symmetrization from a build's cached kNN arrays (``--operator-dir``: a
#: ``metric-knn-*`` stage directory), for when the store is not there yet.
SYMMETRIZE = """
import json, resource, sys, time
import numpy as np
from vocabmetric.cost import CostOperator
def rss_mb():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
indices, costs = np.load(sys.argv[1] + "/indices.npy"), np.load(sys.argv[1] + "/costs.npy")
op = CostOperator(indices, costs, float(costs.max()) * (1 + 1e-6))
base = rss_mb()
t = time.perf_counter(); sym = op.symmetrized() if not op.is_symmetric else op; first = time.perf_counter() - t
t = time.perf_counter(); op.is_symmetric; op.symmetrized(); second = time.perf_counter() - t
print(json.dumps({"first_s": first, "second_s": second, "width": sym.k,
                  "peak_extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
"""


def checkout(commit: str, into: Path) -> Path:
    """The commit's ``vocabmetric/`` package under ``into`` (for PYTHONPATH)."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "vocabmetric"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(code_root: Path, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=code_root)
    if done.returncode:
        raise SystemExit(f"{args[0]} {args[1][:40]!r}... under {code_root} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "runs/demo/metric.zarr"))
    parser.add_argument("--base", default="89e971a")
    parser.add_argument("--only", choices=["plot", "sinkhorn"], default=None)
    parser.add_argument("--operator-dir", default=None, help="sinkhorn: time the symmetrization of this cached "
                        "knn stage (indices.npy, costs.npy) instead of a store's penalty")
    parser.add_argument("--name", default="newcomer_load")
    args = parser.parse_args()
    store = str(Path(args.store).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline " + args.base: checkout(args.base, Path(tmp) / "base"), "this tree": ROOT}
        for label, code in trees.items():
            load = os.getloadavg()[0]
            if args.only in (None, "sinkhorn"):
                what = ["-c", SYMMETRIZE, str(Path(args.operator_dir).resolve())] if args.operator_dir else ["-c", SINKHORN, store]
                seconds, out = run(code, what)
                rows.append({"what": "symmetrize knn" if args.operator_dir else "sinkhorn load", "code": label, "load_1min": load, **json.loads(out.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
            if args.only in (None, "plot"):
                seconds, _ = run(code, ["-m", "vocabmetric.cli", "plot", store, "--kind", "costs", "--out",
                                        str(Path(tmp) / f"costs-{len(rows)}.png")])
                rows.append({"what": "plot --kind costs", "code": label, "load_1min": load, "wall_s": seconds})
                print(rows[-1], flush=True)
    lines = ["| what | code | seconds | second call in the process | peak extra RSS | load (1 min) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["what"] != "plot --kind costs":
            name = "knn operator symmetrized" if r["what"] == "symmetrize knn" else "sinkhorn knn support=64"
            lines.append(f"| {name} (rows padded to {r['width']}) | {r['code']} | {r['first_s']:.1f} | "
                         f"{r['second_s']:.2f} | {r['peak_extra_mb']:.0f} MB | {r['load_1min']:.1f} |")
        else:
            lines.append(f"| `plot --kind costs` | {r['code']} | {r['wall_s']:.1f} | | | {r['load_1min']:.1f} |")
    source = f"operator: {args.operator_dir}" if args.operator_dir and args.only == "sinkhorn" else f"store: {args.store}"
    table = "\n".join(lines) + f"\n\n{source}; cores: {os.cpu_count()}\n"
    print(table)
    write_results(args.name, {"store": args.store, "base": args.base, "rows": rows, "machine": machine_info()}, table)


if __name__ == "__main__":
    main()
