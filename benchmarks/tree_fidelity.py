"""How well averaged k-means trees keep the l2 metric, and what their penalty costs beside full_kl.

On a built store's embeddings (default: the demo store), for each configuration
``branching:n_trees:fit[:follow_knn]`` (``fit`` = jointly fitted edge weights, ``geo`` = not;
``follow_knn`` the rounds of moving split members to their nearest neighbours' side, 0 = plain
k-means, omitted = TreeBuilder's default) it builds the
trees with :class:`~vocabmetric.metrics.TreeBuilder` (as ``[metrics.tree]`` would) and reports

* Spearman(tree cost, l2) over random trained pairs and the 10-NN/median contrast beside
  l2's — exactly :func:`vocabmetric.query.evaluation.tree_fidelity` (the numbers ``vocabmetric eval``
  prints), on the freshly built trees;
* the build time;
* ``TreeWasserstein`` forward+backward over all the trees at V = the store's, N positions,
  as a ratio to ``full_kl`` measured beside it (peaky logits as in ``benchmarks/regularizers.py``).

Targets (issue 18): Spearman ≥ 0.80, contrast within 10% of l2's, penalty ≤ 2× full_kl.

    .venv/bin/python benchmarks/tree_fidelity.py                          # writes results/tree_fidelity.{json,md}
    .venv/bin/python benchmarks/tree_fidelity.py --configs 2:4:fit 2:4:fit:0 16:1:geo:0 --positions 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402
from regularizers import measure, peaky_logits  # noqa: E402

from vocabmetric import open_store  # noqa: E402
from vocabmetric.query.evaluation import tree_fidelity  # noqa: E402
from vocabmetric.metrics import TreeBuilder  # noqa: E402
from vocabmetric.regularizers import TreeWasserstein, full_kl  # noqa: E402
from vocabmetric.store import TREE  # noqa: E402

DEFAULT_CONFIGS = ["2:8:fit", "2:8:fit:0", "2:4:fit"]


class WithTrees:
    """The store, answering ``tree`` costs from other trees (what tree_fidelity reads)."""

    def __init__(self, store, tree):
        self._store, self._tree = store, tree
        self.usable, self.n_trees = store.usable, tree.n_trees

    def __getattr__(self, name):
        return getattr(self._store, name)

    def pair_costs(self, i, j, metric):
        if metric == TREE:
            return np.asarray(self._tree.distance(i, j), dtype=np.float32)
        return self._store.pair_costs(i, j, metric)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/demo/metric.zarr")
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="branching:n_trees:fit|geo[:follow_knn]")
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="tree_fidelity")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    emb, usable = store.embeddings(), store.usable
    logits, ref = peaky_logits(args.positions, store.vocab_size)
    rows = []
    for config in args.configs:
        branching, n_trees, fit, *follow = config.split(":")
        follow_knn = {"follow_knn": int(follow[0])} if follow else {}
        start = time.perf_counter()
        builder = TreeBuilder(branching=int(branching), n_trees=int(n_trees), fit_weights=fit == "fit",
                              progress=False, **follow_knn).fit(emb, usable)
        build_s = time.perf_counter() - start
        tree = builder.to_tree(store.fingerprint)
        f = tree_fidelity(WithTrees(store, tree))
        base = measure(full_kl, logits, ref, args.repeats)  # side by side: the load changes between configs
        penalty = measure(TreeWasserstein(tree), logits, ref, args.repeats)
        rows.append({"branching": int(branching), "n_trees": int(n_trees), "fitted": fit == "fit",
                     "follow_knn": int(builder.params_["follow_knn"]),
                     "spearman": f.spearman, "near_spearman": f.near_spearman, "contrast": f.tree_contrast,
                     "l2_contrast": f.l2_contrast, "build_s": build_s, "n_nodes": int(builder.params_["n_nodes"]),
                     "penalty_s": penalty["seconds"], "full_kl_s": base["seconds"],
                     "penalty_ratio": penalty["seconds"] / base["seconds"], "load": os.getloadavg()[0]})
        print(rows[-1], flush=True)
        payload = {"machine": machine_info(), "store": str(store.path), "V": store.vocab_size, "N": args.positions,
                   "n_trained": int(usable.sum()), "rows": rows}
        write_results(args.name, payload, table(payload))


def table(payload: dict) -> str:
    lines = [f"# Tree fidelity and penalty cost (V = {payload['V']}, {payload['n_trained']} usable tokens, "
             f"N = {payload['N']}, CPU)", "",
             "| branching | n_trees | fitted | follow_knn | spearman | 10-NN spearman | contrast (l2) | contrast / l2's | "
             "build (s) | penalty × full_kl | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['branching']} | {r['n_trees']} | {'yes' if r['fitted'] else 'no'} | {r.get('follow_knn', 0)} | "
                     f"{r['spearman']:.3f} | {r['near_spearman']:.3f} | {r['contrast']:.3f} ({r['l2_contrast']:.3f}) | "
                     f"{r['contrast'] / r['l2_contrast']:.3f} | {r['build_s']:.0f} | "
                     f"{r['penalty_ratio']:.2f} | {r['load']:.1f} |")
    lines += ["", "Targets: spearman ≥ 0.80; contrast within 10% of l2's; penalty ≤ 2× full_kl (fwd+bwd).",
              f"Machine: {payload['machine'].get('cpu')}, {payload['machine'].get('cores')} cores (shared: see load)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
