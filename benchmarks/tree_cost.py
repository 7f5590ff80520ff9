"""Tree-Wasserstein on a store's own trees beside ``full_kl``, forward + backward, same run.

The cost of :class:`~vocabmetric.regularizers.TreeWasserstein` is O(V + nodes) per
position, and the nodes are those of every stored tree: T fitted binary trees over the
placed tokens of a composed build hold far more nodes than one 16-way tree over the
trained tokens. This times the penalty ``TreeWasserstein.from_store(store)`` of each
store given (e.g. the demo build and an older one) against ``full_kl`` on the same peaky
logits (``benchmarks/regularizers.py``'s), best of ``--repeats``.

    .venv/bin/python benchmarks/tree_cost.py --stores runs/demo/metric.zarr [more stores] [--positions 24 1024]
    # writes benchmarks/results/tree_cost.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from _machine import machine_info, write_results  # noqa: E402
from regularizers import measure, peaky_logits  # noqa: E402

import vocabmetric as vm  # noqa: E402
from vocabmetric.regularizers import TreeWasserstein, full_kl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", nargs="+", type=Path, default=[Path("runs/demo/metric.zarr")])
    ap.add_argument("--positions", type=int, nargs="+", default=[24, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.stores:
        store = vm.open_store(path)
        tree = TreeWasserstein.from_store(store)
        trees = getattr(store.tree(), "trees", [store.tree()])
        nodes = sum(int(t.n_nodes) for t in trees)
        placed = int(store.usable.sum())
        for n in args.positions:
            z, ref = peaky_logits(n, store.vocab_size)
            kl = measure(lambda x, y: full_kl(x, y).sum(), z, ref, args.repeats)
            tw = measure(lambda x, y: tree(x, y).sum(), z, ref, args.repeats)
            rows.append(dict(store=str(path), n_trees=len(trees), nodes=nodes, placed=placed, positions=n,
                             full_kl_s=kl["seconds"], tree_s=tw["seconds"], ratio=tw["seconds"] / kl["seconds"]))
            print(rows[-1], flush=True)
    load = os.getloadavg()
    md = ["# Tree-Wasserstein on a store's trees beside full_kl (CPU)", "",
          f"`benchmarks/tree_cost.py`, forward + backward, float32, {args.threads} threads, best of "
          f"{args.repeats}; load average at the end {load[0]:.1f}. Target for the default trees: ≤ 2 × `full_kl` "
          "at N = 1,024.", "",
          "| store | trees | nodes | placed tokens | N | full_kl s | tree s | × full_kl |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| `{r['store']}` | {r['n_trees']} | {r['nodes']:,} | {r['placed']:,} | {r['positions']} | "
           f"{r['full_kl_s']:.3f} | {r['tree_s']:.3f} | {r['ratio']:.2f} |" for r in rows]
    write_results("tree_cost", {"benchmark": "tree_cost", "machine": machine_info(), "load_average": load,
                                "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
