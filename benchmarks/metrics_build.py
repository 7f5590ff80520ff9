"""Build time and peak memory of every ground metric, with baselines side by side.

Data: random-but-clustered embeddings, a two-level Gaussian mixture (V tokens, d=128, V/200
overlapping clusters of Zipf-like sizes, a fraction ``--untrained`` of tokens untrained, 5 %
by default, 0 for a fully-trained vocabulary; see ``clustered_embeddings``), generated from a
seed in each worker.

Each metric is built in its own subprocess (so ``ru_maxrss``, the RSS high-water mark, is
that metric's peak; the data itself is reported as ``data_mb``; ``cpu_s`` is the build's
user + system CPU time over all threads, the figure to read on busy cores), with ``--threads`` cores
for faiss (OpenMP) and numba. The pipeline's settings: knn k=64 (flat and hnsw),
geodesic k_graph=10 / k=128, umap 8-D / k=64, tree = the pipeline default (8 binary k-means trees, weights fitted;
``tree_kmeans16``: one 16-way tree, the default before), Ward on the
10-NN graph. The kNN graph is built once (by the flat knn worker) and read by geodesic,
umap and ward, as in the pipeline; its time is the knn time.

Baselines in the same run:

* ``floor``: faiss exact all-kNN (``IndexFlatIP`` search of every vector, k+1 hits, faiss's
  default BLAS blocks), with none of our work (float64 recompute, self drop by id, cap) — the
  knn floor.
* ``knn_flat_before``: the flat kNN build as it was before issue 17 (faiss's default
  1024-vector database blocks, each pair's distance recomputed by ``l2_distance``), to read
  the speed-up side by side; it reports the share of sampled rows whose neighbour set equals
  ``knn_flat``'s.
* per-source shortest paths on the same symmetrized 10-NN graph, single-threaded:
  ``scipy.sparse.csgraph.dijkstra`` full, and with ``limit`` = the source's 128-th path
  length (so it settles about as many nodes as ours), against our bounded numba kernel.
* the two tree builders: time and Spearman ρ of tree distance vs l2 on 20000 random pairs.

Usage::

    python benchmarks/metrics_build.py                      # V = 100277 and 248077
    python benchmarks/metrics_build.py --sizes 20000        # a quick check
    python benchmarks/metrics_build.py --sizes 20000 --only knn_flat geodesic tree_kmeans
    python benchmarks/metrics_build.py --sizes 248077 --untrained 0 --only knn_flat geodesic tree_kmeans floor knn_hnsw

The TARGET metrics run first, then the rest (results are written after each metric).

Results merge into ``benchmarks/results/metrics_build.{json,md}`` keyed by V. CPU timings
on a shared machine are noisy: prefer the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

WORKERS = ["floor", "knn_flat", "knn_flat_before", "knn_hnsw", "geodesic", "umap", "tree_kmeans", "tree_kmeans16", "tree_ward"]
TARGET = ("knn_flat", "geodesic", "tree_kmeans")  # the budget: ≤ 15 min, ≤ 8 GB at V = 248077 (issue 17)
TARGET_V = 248077
K, K_GRAPH, K_GEO, UMAP_NEIGHBORS = 64, 10, 128, 15


def clustered_embeddings(vocab_size: int, dim: int, seed: int = 0, untrained: float = 0.05):
    """A two-level Gaussian mixture: (V, d) float32 and the trained mask (``untrained`` of them off).

    V/4000 "topics" ~ N(0, I); V/200 clusters at topic + 0.4·N(0, I) with Zipf-like
    sizes; tokens at cluster + s·N(0, I), s ~ U(1, 2) per cluster. The overlap is chosen so
    the 10-NN graph is one component (at V = 20000), as it is for real word vectors;
    well-separated blobs would make every shortest-path search end at its blob's edge.
    """
    rng = np.random.default_rng(seed)
    n_topics, n_clusters = max(vocab_size // 4000, 4), max(vocab_size // 200, 8)
    topics = rng.normal(size=(n_topics, dim)).astype(np.float32)
    centers = topics[rng.integers(0, n_topics, n_clusters)] + 0.4 * rng.normal(size=(n_clusters, dim)).astype(np.float32)
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    label = rng.choice(n_clusters, vocab_size, p=sizes / sizes.sum())
    spread = rng.uniform(1.0, 2.0, n_clusters).astype(np.float32)
    x = centers[label] + spread[label, None] * rng.normal(size=(vocab_size, dim)).astype(np.float32)
    trained = rng.random(vocab_size) >= untrained  # drawn whatever the fraction: same vectors
    return np.ascontiguousarray(x, dtype=np.float32), trained


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- workers (each in its own process) ----------------------------------------------------
def worker(name: str, vocab_size: int, dim: int, threads: int, work: Path, untrained: float) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    x, trained = clustered_embeddings(vocab_size, dim, untrained=untrained)
    out = {"data_mb": peak_mb()}
    graph = None
    if name in ("geodesic", "umap", "tree_ward", "tree_kmeans"):  # the pipeline hands each the knn table
        graph = (np.load(work / "knn_indices.npy"), np.load(work / "knn_costs.npy"))
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    if name == "floor":
        from vocabmetric.metrics import normalized

        unit = normalized(x[trained])
        index = faiss.IndexFlatIP(dim)
        index.add(unit)
        for s in range(0, len(unit), 4096):
            index.search(unit[s : s + 4096], K + 1)
    elif name in ("knn_flat", "knn_hnsw"):
        from vocabmetric.metrics import KnnMetric

        m = KnnMetric(k=K, index=name[4:], progress=False).fit(x, trained)
        out["seconds"], out["cpu_s"] = time.perf_counter() - t0, cpu_seconds() - cpu0
        if name == "knn_flat":
            np.save(work / "knn_indices.npy", m.indices_[:, :UMAP_NEIGHBORS])
            np.save(work / "knn_costs.npy", m.costs_[:, :UMAP_NEIGHBORS])
            np.save(work / "knn_sample.npy", m.indices_[:: max(vocab_size // 2000, 1)])
        else:
            exact = np.load(work / "knn_sample.npy")
            approx = m.indices_[:: max(vocab_size // 2000, 1)]
            ok = exact[:, 0] >= 0
            out["recall_at_64"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(exact[ok], approx[ok])]))
    elif name == "knn_flat_before":
        out.update(knn_flat_before(x, trained, dim, t0, cpu0))
        exact = np.load(work / "knn_sample.npy")
        before = out.pop("indices")[:: max(vocab_size // 2000, 1)]
        out["same_sets_as_knn_flat"] = float(np.mean([set(a) == set(b) for a, b in zip(exact, before)]))
    elif name == "geodesic":
        from vocabmetric.metrics import GeodesicMetric

        m = GeodesicMetric(k_graph=K_GRAPH, k=K_GEO, n_jobs=threads, progress=False).fit(
            x, trained, knn=(graph[0][:, :K_GRAPH], graph[1][:, :K_GRAPH]))
        out["seconds"], out["cpu_s"] = time.perf_counter() - t0, cpu_seconds() - cpu0
        out["ms_per_source_all_threads"] = 1000 * out["seconds"] / trained.sum()
        out.update(dijkstra_baselines(graph, trained, vocab_size, m))
    elif name == "umap":
        from vocabmetric.metrics import UmapMetric

        UmapMetric(n_components=8, k=K, n_neighbors=UMAP_NEIGHBORS, progress=False).fit(x, trained, knn=graph)
    elif name in ("tree_kmeans", "tree_kmeans16", "tree_ward"):
        from scipy.stats import spearmanr

        from vocabmetric.metrics import TreeBuilder, WardTreeBuilder
        from vocabmetric.metrics import l2_distance, random_pairs

        if name == "tree_kmeans":  # the pipeline's default tree; the fit's near pairs from the kNN table
            b = TreeBuilder(progress=False).fit(x, trained, knn=graph)
        elif name == "tree_kmeans16":
            b = TreeBuilder(branching=16, n_trees=1, fit_weights=False, progress=False).fit(x, trained)
        else:
            b = WardTreeBuilder(n_neighbors=K_GRAPH, progress=False).fit(x, trained, knn=(graph[0][:, :K_GRAPH], graph[1][:, :K_GRAPH]))
        out["seconds"], out["cpu_s"] = time.perf_counter() - t0, cpu_seconds() - cpu0
        tree = b.to_tree()
        a, c = random_pairs(np.flatnonzero(trained), 20000, 1)
        out["spearman_vs_l2"] = float(spearmanr(tree.distance(a, c), l2_distance(x, a, c)).statistic)
        # the same on near pairs: each token with its 10 nearest (what a regularizer mostly moves)
        near = np.load(work / "knn_indices.npy")[:, :K_GRAPH]
        rows = np.flatnonzero(trained)[:: max(vocab_size // 2000, 1)]
        ii, jj = np.repeat(rows, K_GRAPH), near[rows].ravel()
        out["spearman_vs_l2_near"] = float(spearmanr(tree.distance(ii, jj), l2_distance(x, ii, jj)).statistic)
        trees = getattr(tree, "trees", [tree])
        out["depth"], out["n_nodes"] = max(int(t.depth.max()) for t in trees), sum(int(t.n_nodes) for t in trees)
        out["n_trees"] = len(trees)
    out.setdefault("seconds", time.perf_counter() - t0)
    out.setdefault("cpu_s", cpu_seconds() - cpu0)
    out["peak_mb"] = peak_mb()
    return out


def knn_flat_before(x, trained, dim, t0, cpu0) -> dict:
    """KnnMetric(index="flat").fit before issue 17, its steps inlined: (V, K) ids, time, CPU."""
    import faiss

    from vocabmetric.metrics import KnnMetric, drop_self, l2_distance, normalized, random_pairs

    trained_ids = np.flatnonzero(trained)
    unit = normalized(x)[trained_ids]
    index = faiss.IndexFlatIP(dim)
    index.add(unit)
    found = np.empty((len(unit), K), dtype=np.int64)
    for s in range(0, len(unit), 4096):
        _, hits = index.search(unit[s : s + 4096], K + 1)
        found[s : s + len(hits)] = drop_self(hits, np.arange(s, s + len(hits)))
    indices = np.full((len(x), K), -1, dtype=np.int64)
    costs = np.zeros((len(x), K))
    indices[trained_ids] = trained_ids[found]
    costs[trained_ids] = l2_distance(x, np.repeat(trained_ids, K), trained_ids[found].ravel()).reshape(-1, K)
    a, b = random_pairs(trained_ids, 20000, 0)
    m = KnnMetric(k=K, progress=False)._finish(indices, costs, l2_distance(x, a, b), None, index="flat")
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0, "indices": m.indices_}


def dijkstra_baselines(graph, trained, vocab_size, fitted, n_sources: int = 200) -> dict:
    """Per-source ms, one thread: scipy full, scipy with limit, our bounded kernel."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    from vocabmetric.metrics import bounded_dijkstra, knn_graph

    indptr, nbr, weight = knn_graph(graph[0][:, :K_GRAPH].astype(np.int64), graph[1][:, :K_GRAPH].astype(np.float64), vocab_size)
    csr = csr_matrix((weight + 1e-300, nbr, indptr), shape=(vocab_size, vocab_size))
    rng = np.random.default_rng(0)
    sources = rng.choice(np.flatnonzero(trained), n_sources, replace=False)
    bounded_dijkstra(indptr, nbr, weight, sources[:2], K_GEO, vocab_size, n_jobs=1)  # compile / load
    t = time.perf_counter()
    bounded_dijkstra(indptr, nbr, weight, sources, K_GEO, vocab_size, n_jobs=1, batch_size=n_sources)
    ours = (time.perf_counter() - t) / n_sources
    radius = fitted.costs_[sources, K_GEO - 1].astype(np.float64)
    t = time.perf_counter()
    for s, r in zip(sources[:50], radius[:50]):
        dijkstra(csr, directed=False, indices=[s], limit=r * (1 + 1e-9))
    limited = (time.perf_counter() - t) / 50
    t = time.perf_counter()  # scipy's fixed cost per call (graph validation), settling only the source
    for s in sources[:50]:
        dijkstra(csr, directed=False, indices=[s], limit=0.0)
    overhead = (time.perf_counter() - t) / 50
    t = time.perf_counter()
    dijkstra(csr, directed=False, indices=sources[:10])
    full = (time.perf_counter() - t) / 10
    return {"dijkstra_ms_per_source": {"ours_1_thread": 1000 * ours, "scipy_limit": 1000 * limited,
                                       "scipy_full": 1000 * full, "scipy_per_call_overhead": 1000 * overhead},
            "graph_edges": int(len(nbr) // 2), "graph_max_degree": int(np.diff(indptr).max())}


# -- driver ---------------------------------------------------------------------------------
def machine_info_apart() -> dict:
    """``machine_info()`` from a child process: it imports torch, gensim and zarr, and Linux
    carries a parent's RSS high-water mark into the workers it forks (``ru_maxrss``)."""
    code = "import json, _machine; print(json.dumps(_machine.machine_info()))"
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                                     check=True).stdout)


def run_worker(name, vocab_size, dim, threads, work, timeout, untrained) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", str(vocab_size), "--dim", str(dim),
           "--threads", str(threads), "--work", str(work), "--untrained", str(untrained)]
    t, load = time.perf_counter(), os.getloadavg()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_with_startup_s"] = time.perf_counter() - t
    result["load_average_start"], result["load_average_end"] = load, os.getloadavg()
    return result


def table(runs: dict, threads: int) -> str:
    lines = [f"# metrics_build: build time and peak memory per metric (d=128, {threads} threads)", "",
             "CPU timings on a shared 2-core machine are noisy (other engineers' jobs ran beside these): "
             "prefer the ratios. `peak` is the worker's RSS high-water mark, `data` the part taken by the "
             "embeddings before the build.", ""]
    for v, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        res = run["results"]
        untrained = run.get("untrained", 0.05)
        lines += [f"## V = {int(v):,}", "", f"{untrained:.0%} of tokens untrained."]
        if "load_average_start" in run:
            lines[-1] += (f" Load average (1 min) {run['load_average_start'][0]:.1f} at the start, "
                          f"{run['load_average_after'][0]:.1f} at the end: other jobs shared the 2 cores, so "
                          "wall time overstates what the build needs; `CPU s` (all threads) does not.")
        lines += ["", "| metric | build s | CPU s | peak MB | data MB | load at start | notes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        floor = res.get("floor", {}).get("seconds")
        for name in WORKERS:
            r = res.get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | — | — | — | — | — | {r['error']} |")
                continue
            note = ""
            if name == "knn_flat" and floor:
                note = f"{r['seconds'] / floor:.2f}× the faiss floor"
                if "cpu_s" in r and "cpu_s" in res["floor"]:
                    note += f" ({r['cpu_s'] / res['floor']['cpu_s']:.2f}× its CPU time)"
            if name == "knn_flat_before":
                flat = res.get("knn_flat", {})
                note = ("before issue 17 (faiss's default blocks, per-pair recompute)"
                        + (f": {r['cpu_s'] / flat['cpu_s']:.2f}× knn_flat's CPU time, {r['seconds'] / flat['seconds']:.2f}× its wall"
                           if "cpu_s" in flat and "cpu_s" in r else "")
                        + f"; sampled rows with knn_flat's neighbour set: {r['same_sets_as_knn_flat']:.4f}")
            if name == "knn_hnsw":
                note = f"recall@64 {r['recall_at_64']:.3f}" + (f", {r['seconds'] / floor:.2f}× the floor" if floor else "")
            if name == "geodesic":
                d = r["dijkstra_ms_per_source"]
                note = (f"per source, 1 thread: ours {d['ours_1_thread']:.3f} ms, scipy limit {d['scipy_limit']:.2f} ms "
                        f"({d['scipy_limit'] / d['ours_1_thread']:.0f}×), scipy full {d['scipy_full']:.1f} ms "
                        f"({d['scipy_full'] / d['ours_1_thread']:.0f}×)"
                        + (f"; scipy's per-call overhead {d['scipy_per_call_overhead']:.2f} ms" if "scipy_per_call_overhead" in d else "")
                        + f"; graph max degree {r['graph_max_degree']}")
            if name.startswith("tree"):
                note = (f"ρ(tree, l2) random pairs {r['spearman_vs_l2']:.3f}, 10-NN pairs {r['spearman_vs_l2_near']:.3f}; "
                        f"{r.get('n_trees', 1)} tree(s), depth {r['depth']}, {r['n_nodes']:,} nodes")
            if name == "floor":
                note = "faiss IndexFlatIP all-kNN, k=65 (baseline)"
            cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "—"
            load = f"{r['load_average_start'][0]:.1f}" if "load_average_start" in r else "—"
            lines.append(f"| {name} | {r['seconds']:.1f} | {cpu} | {r['peak_mb']:.0f} | {r['data_mb']:.0f} | {load} | {note} |")
        ok = [res.get(n, {}) for n in TARGET]
        if all("seconds" in r for r in ok):
            total, peak = sum(r["seconds"] for r in ok), max(r["peak_mb"] for r in ok)
            line = f"knn + geodesic + tree (k-means): **{total / 60:.1f} min**, peak **{peak / 1024:.2f} GB**"
            if all("cpu_s" in r for r in ok):
                cpu = sum(r["cpu_s"] for r in ok)
                line += f"; {cpu / 60:.1f} min of CPU time (on 2 idle cores the wall time lies between half that and all of it)"
            lines += ["", line + f" (target at V = {TARGET_V:,}: ≤ 15 min and ≤ 8 GB on 2 cores)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100277, TARGET_V])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=WORKERS, default=WORKERS)
    ap.add_argument("--untrained", type=float, default=0.05, help="fraction of untrained tokens (0: fully trained)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per metric")
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.dim, args.threads, args.work, args.untrained)))
        return

    from _machine import RESULTS, write_results

    previous = RESULTS / "metrics_build.json"
    runs = {}
    if previous.exists():
        old = json.loads(previous.read_text())
        if old.get("dim") == args.dim and old.get("threads") == args.threads:
            runs = old.get("runs", {})
    needs_graph = {"knn_hnsw", "knn_flat_before", "geodesic", "umap", "tree_kmeans", "tree_kmeans16", "tree_ward"}
    for v in args.sizes:
        only = list(args.only)
        if needs_graph & set(only) and "knn_flat" not in only:
            only.insert(0, "knn_flat")  # they read its kNN graph
        earlier = runs.get(str(v), {})  # metrics not rerun keep their rows (same V, same data)
        results = dict(earlier.get("results", {})) if earlier.get("untrained") == args.untrained else {}
        runs[str(v)] = {"results": results, "machine": machine_info_apart(), "untrained": args.untrained,
                        "load_average_start": os.getloadavg()}
        order = [w for w in TARGET if w in only] + [w for w in WORKERS if w in only and w not in TARGET]
        with tempfile.TemporaryDirectory(prefix="metrics_build-") as work:
            for name in order:
                print(f"V={v} {name} ...", file=sys.stderr, flush=True)
                results[name] = run_worker(name, v, args.dim, args.threads, Path(work), args.timeout, args.untrained)
                print(f"  {json.dumps(results[name])}", file=sys.stderr, flush=True)
                runs[str(v)]["load_average_after"] = os.getloadavg()
                payload = {"benchmark": "metrics_build", "dim": args.dim, "threads": args.threads, "runs": runs}
                write_results("metrics_build", payload, table(runs, args.threads))
    print(table(runs, args.threads))


if __name__ == "__main__":
    main()
