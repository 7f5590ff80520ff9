"""Throughput and latency of the ground-cost service under a real load generator (``hey``),
beside a bare Starlette JSON endpoint served the same way, in the same run.

    make loadgen                                       # apt-get install hey (root) once
    .venv/bin/python benchmarks/service_latency.py     # the demo store if built, else synthetic V = 100k
    .venv/bin/python benchmarks/service_latency.py --duration 3 --store runs/demo/metric.zarr

Setup. The service is ``vocabmetric serve STORE --workers N --no-access-log`` on loopback
(uvicorn, h11, the service's protocol: TCP_NODELAY and timeouts). The bare endpoint is a
Starlette app with one route returning a fixed JSON body the size of a neighbours answer,
run under the same uvicorn configuration and worker count, so the ratio isolates what
the service adds (routing, validation, the query, serialization, the middleware). The load
is ``hey`` (Go, its own process): ``GET /neighbors?id=…&k=10&metric=knn`` for ``--duration``
seconds at 1, 50 and 200 connections (keep-alive), with one and two workers.

Targets: the service ≥ 0.8× the bare endpoint's requests/s per worker; two workers ≥ 1.6×
one worker's at 200 connections; p99 at one connection ≤ 2 ms.

Caveat: hey and the server(s) share the machine's cores (2 on the reference machine,
shared with other jobs): absolute numbers are noisy and two workers cannot scale past the
cores hey leaves free.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

NAME = "service_latency"
CONNECTIONS = (1, 50, 200)
WORKERS = (1, 2)
VOCABMETRIC = Path(sys.executable).with_name("vocabmetric")


# -- the synthetic store -----------------------------------------------------------------
class _SyntheticTokenizer:
    def __init__(self, vocab_size: int, seed: int):
        self.spec = f"synthetic:{vocab_size}:{seed}"
        self.fingerprint = f"synthetic-{vocab_size}-{seed}"


def synthetic_store(path: Path, vocab_size: int = 100_000, dim: int = 32, n_clusters: int = 2000, k: int = 64, seed: int = 0) -> Path:
    """Write (once) a store of ``vocab_size`` clustered random embeddings with a knn metric."""
    from vocabmetric.building.embeddings import Embeddings
    from vocabmetric.metrics import KnnMetric
    from vocabmetric.store import TruncatedMetric, write_store

    marker = path / "zarr.json"
    if marker.is_file() and json.loads(marker.read_text()).get("attributes", {}).get("tokenizer", {}).get("vocab_size") == vocab_size:
        return path
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, n_clusters, vocab_size)] + 0.35 * rng.normal(size=(vocab_size, dim)).astype(np.float32)
    trained = np.ones(vocab_size, dtype=bool)
    emb = Embeddings(vectors, trained, np.full(vocab_size, -1, np.int32), "synthetic", {"n_clusters": n_clusters, "seed": seed})
    t0 = time.perf_counter()
    knn = KnnMetric(k=k, index="hnsw", progress=False).fit(vectors, trained)
    print(f"knn (hnsw) over V={vocab_size}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # distinct, valid UTF-8 texts, most with a leading space like BPE tokens
    token_bytes = [(f" t{i}" if i % 3 else f"t{i}").encode() for i in range(vocab_size)]
    write_store(
        path,
        tokenizer=_SyntheticTokenizer(vocab_size, seed),
        token_bytes=token_bytes,
        counts=np.ones(vocab_size, np.int64),
        embeddings=emb,
        corpus={"sources": [], "n_documents": 0, "n_tokens": 0},
        metrics={"knn": TruncatedMetric(knn.indices_, knn.costs_, knn.cap_, {**knn.params_, "name": "knn"})},
    )
    return path


# -- the bare endpoint ---------------------------------------------------------------------
def bare_app():
    """A Starlette app: ``GET /neighbors`` answers a fixed ~0.6 KB JSON body (10 neighbours)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    body = {"query": {"id": 5, "text": " t5"}, "metric": "knn", "k": 10,
            "neighbors": [{"id": 100 + n, "text": f" t{100 + n}", "cost": 0.1 * n} for n in range(10)]}

    async def neighbors(request):
        return JSONResponse(body)

    return Starlette(routes=[Route("/neighbors", neighbors), Route("/healthz", neighbors)])


def serve_bare(port: int, workers: int) -> None:
    """Run the bare app under the service's uvicorn configuration."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from vocabmetric.query.service import uvicorn_config

    settings = dict(host="127.0.0.1", port=port, workers=workers, log_level="warning", access_log=False)
    if workers == 1:
        uvicorn.Server(uvicorn_config(bare_app(), **settings)).run()
    else:
        config = uvicorn_config("service_latency:bare_app", factory=True, **settings)  # sys.path travels
        Multiprocess(config, sockets=[config.bind_socket()]).run()


# -- servers and load ------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 180.0) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd} did not answer /healthz within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def hey(url: str, connections: int, duration: float) -> dict:
    """Run hey; requests/s, p50/p99 latency (ms) and non-200 responses from its summary."""
    out = subprocess.run(["hey", "-z", f"{duration}s", "-c", str(connections), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    quantile = {int(q): float(s) * 1e3 for q, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    return {"requests_per_s": rps, "p50_ms": quantile.get(50), "p99_ms": quantile.get(99),
            "responses": sum(codes.values()), "non_200": sum(n for c, n in codes.items() if c != 200)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="a store (default runs/demo/metric.zarr if built, else synthetic)")
    parser.add_argument("--vocab-size", type=int, default=100_000, help="of the synthetic store")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per row")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, written into the table")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--serve-bare", nargs=2, type=int, metavar=("PORT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        return serve_bare(*args.serve_bare)
    if shutil.which("hey") is None:
        sys.exit("hey is not installed: `make loadgen` (Debian: apt-get install hey)")

    from _machine import machine_info, write_results

    from vocabmetric.store import open_store

    demo = REPO / "runs" / "demo" / "metric.zarr"
    store_path = args.store or (demo if (demo / "zarr.json").is_file() else
                                synthetic_store(REPO / "runs" / "bench-service" / "metric.zarr", args.vocab_size))
    store = open_store(store_path)
    usable = np.flatnonzero(store.usable)
    query = f"/neighbors?id={int(usable[len(usable) // 3])}&k=10&metric=knn"
    rows = []
    for workers in WORKERS:
        for target in ("bare", "service"):
            port = free_port()
            cmd = ([sys.executable, __file__, "--serve-bare", str(port), str(workers)] if target == "bare" else
                   [str(VOCABMETRIC), "serve", str(store_path), "--port", str(port), "--workers", str(workers), "--no-access-log"])
            proc = start(cmd, port)
            try:
                url = f"http://127.0.0.1:{port}{query}"
                hey(url, 50, min(2.0, args.duration))  # warm-up: connections, caches
                for connections in CONNECTIONS:
                    row = {"target": target, "workers": workers, "connections": connections, **hey(url, connections, args.duration)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
            finally:
                stop(proc)

    def rps(target, workers, connections):
        return next(r["requests_per_s"] for r in rows if (r["target"], r["workers"], r["connections"]) == (target, workers, connections))

    per_worker = {w: min(rps("service", w, c) / rps("bare", w, c) for c in CONNECTIONS[1:]) for w in WORKERS}
    scaling = rps("service", 2, 200) / rps("service", 1, 200)
    p99_one = max(r["p99_ms"] for r in rows if r["target"] == "service" and r["connections"] == 1)
    targets = {"service_over_bare_min": per_worker, "service_over_bare_met": all(v >= 0.8 for v in per_worker.values()),
               "two_over_one_workers_at_200": scaling, "scaling_met": scaling >= 1.6,
               "p99_ms_at_one_connection": p99_one, "p99_met": p99_one <= 2.0}
    m = machine_info()
    m["load_average_1min_after"] = os.getloadavg()[0]
    payload = {"store": str(store_path), "vocab_size": store.vocab_size, "query": query, "duration_s": args.duration,
               "load_generator": subprocess.run(["sh", "-c", "dpkg-query -W hey 2>/dev/null || echo hey"],
                                                capture_output=True, text=True).stdout.strip(),
               "note": args.note, "rows": rows, "targets": targets, "machine": m}
    lines = [
        f"# Service throughput and latency: `GET {query}` (V = {store.vocab_size:,}) beside a bare Starlette endpoint",
        "",
        f"Command: `.venv/bin/python benchmarks/service_latency.py --duration {args.duration:g}`. Load: hey, "
        f"{args.duration:g} s per row, keep-alive. Machine: {m['cpu']}, {m['cores']} cores; hey and the server share them "
        f"(load average {m['load_average_1min_after']:.1f} at the end). {args.note}",
        "",
        "| workers | connections | bare req/s | service req/s | service / bare | bare p50 ms | service p50 ms | bare p99 ms | service p99 ms | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workers in WORKERS:
        for c in CONNECTIONS:
            b, s = (next(r for r in rows if (r["target"], r["workers"], r["connections"]) == (t, workers, c)) for t in ("bare", "service"))
            lines.append(f"| {workers} | {c} | {b['requests_per_s']:.0f} | {s['requests_per_s']:.0f} | "
                         f"{s['requests_per_s'] / b['requests_per_s']:.2f}x | {b['p50_ms']:.2f} | {s['p50_ms']:.2f} | "
                         f"{b['p99_ms']:.2f} | {s['p99_ms']:.2f} | {b['non_200'] + s['non_200']} |")
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines += [
        "",
        f"- service ≥ 0.8× bare per worker (worst of 50/200 connections): "
        f"{', '.join(f'{w} worker(s) {v:.2f}x' for w, v in per_worker.items())}: {verdict(targets['service_over_bare_met'])}.",
        f"- two workers ≥ 1.6× one at 200 connections: {scaling:.2f}x: {verdict(targets['scaling_met'])}.",
        f"- p99 at one connection ≤ 2 ms: {p99_one:.2f} ms: {verdict(targets['p99_met'])}.",
        "",
    ]
    table = "\n".join(lines)
    write_results(NAME, payload, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
