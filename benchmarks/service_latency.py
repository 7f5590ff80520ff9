"""Latency and throughput of the ground-cost service under concurrent load, beside the
in-process Python API on the same queries.

    .venv/bin/python benchmarks/service_latency.py                 # synthetic store, V = 100 000
    .venv/bin/python benchmarks/service_latency.py --store runs/demo/metric.zarr
    .venv/bin/python benchmarks/service_latency.py --vocab-size 20000 --requests 1000   # quick

Setup. By default a synthetic store is written once (``runs/bench-service/metric.zarr``,
reused on later runs): V token ids with embeddings drawn around 2 000 random cluster
centres (d = 32), a ``knn`` metric (``KnnMetric``, HNSW, k = 64) and the exact ``l2``.
The service runs as a real uvicorn process (one worker, the app of ``vocabmetric serve``, access
log off) on loopback;
the load comes from a separate process (``--load-worker``): ``--concurrency`` asyncio
clients, each on its own keep-alive connection, share ``--requests`` requests per endpoint:

* ``GET /neighbors?id=…&k=10&metric=knn`` (random ids),
* ``POST /cost`` with 64 random pairs under ``knn``.

Measured. Client side: p50/p99 latency of each request (send → body read) and requests/s
over the whole load. Server side, from the ``Server-Timing`` header: p50/p99 of ``app``, the
wall time from the app taking up the request to its response headers (threadpool wait
included; HTTP parsing, the socket and the backlog not), and p99 of ``cpu``, the server
thread's CPU time meanwhile (what the request cost, without the OS descheduling the server
in favour of other jobs). The load average during the run is recorded. Baseline: the same queries through the
in-process :class:`MetricStore` (``store.neighbors`` / vectorized ``pair_costs``), timed
one by one; the ratio client p50 / in-process p50 is the cost of HTTP + JSON + queueing.

Caveat: a 2-core machine shared with other jobs, and the load generator competes with the
server for those cores; absolute numbers are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

NAME = "service_latency"
N_PAIRS = 64  # pairs per POST /cost request
SERIAL_REQUESTS = 300  # requests of the one-client pass (the unloaded round trip)


# -- the synthetic store -----------------------------------------------------------------
class _SyntheticTokenizer:
    def __init__(self, vocab_size: int, seed: int):
        self.spec = f"synthetic:{vocab_size}:{seed}"
        self.fingerprint = f"synthetic-{vocab_size}-{seed}"


def synthetic_store(path: Path, vocab_size: int = 100_000, dim: int = 32, n_clusters: int = 2000, k: int = 64, seed: int = 0) -> Path:
    """Write (once) a store of ``vocab_size`` clustered random embeddings with a knn metric."""
    from vocabmetric.embeddings import Embeddings
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


# -- the server ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    import httpx

    # uvicorn on the service's app factory, as `vocabmetric serve` runs it, minus the access
    # log (one synchronous log line per request would be part of what is timed)
    from vocabmetric.service import FACTORY, STORE_ENV

    env = {**os.environ, STORE_ENV: str(Path(store).resolve())}
    cmd = [sys.executable, "-m", "uvicorn", FACTORY, "--factory",
           "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /healthz within {timeout} s")


# -- the load (runs in its own process) -------------------------------------------------------
def _http_request(r: dict, host: str) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request."""
    from urllib.parse import urlencode

    path = r["path"] + ("?" + urlencode(r["params"]) if r.get("params") else "")
    body = json.dumps(r["json"]).encode() if "json" in r else b""
    head = f"{r['method']} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def _load(base_url: str, requests: list[dict], concurrency: int) -> dict:
    """``concurrency`` keep-alive connections share ``requests``; a minimal HTTP/1.1 client on
    asyncio streams (httpx would spend more CPU per request than the server does, on the
    same 2 cores). Every request is prepared before the clock starts."""
    host, port = base_url.split("://")[1].split(":")
    wire = [_http_request(r, host) for r in requests]
    client_ms = np.zeros(len(requests))
    server_ms = np.zeros(len(requests))
    cpu_ms = np.zeros(len(requests))
    status = np.zeros(len(requests), dtype=int)
    queue = iter(range(len(requests)))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for n in queue:
                t0 = time.perf_counter()
                writer.write(wire[n])
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                headers = {k.lower(): v for k, v in headers.items()}
                await reader.readexactly(int(headers["content-length"]))
                client_ms[n] = (time.perf_counter() - t0) * 1e3
                status[n] = int(lines[0].split()[1])
                timing = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
                server_ms[n], cpu_ms[n] = float(timing["app"]), float(timing["cpu"])
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"client_ms": client_ms.tolist(), "server_ms": server_ms.tolist(), "cpu_ms": cpu_ms.tolist(), "wall_s": wall, "errors": int((status != 200).sum())}


def load_worker() -> None:
    spec = json.load(sys.stdin)
    json.dump(asyncio.run(_load(spec["base_url"], spec["requests"], spec["concurrency"])), sys.stdout)


def run_load(base_url: str, requests: list[dict], concurrency: int) -> dict:
    spec = json.dumps({"base_url": base_url, "requests": requests, "concurrency": concurrency})
    out = subprocess.run([sys.executable, __file__, "--load-worker"], input=spec, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# -- the in-process baseline --------------------------------------------------------------------
def in_process_ms(fn, args: list) -> np.ndarray:
    out = np.empty(len(args))
    for n, a in enumerate(args):
        t0 = time.perf_counter()
        fn(*a)
        out[n] = (time.perf_counter() - t0) * 1e3
    return out


def pct(x, q: float) -> float:
    return float(np.percentile(np.asarray(x, dtype=float), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="an existing store (default: the synthetic one)")
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000, help="requests per endpoint")
    parser.add_argument("--metric", default="knn")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_worker:
        return load_worker()

    from _machine import machine_info, write_results

    from vocabmetric.store import open_store

    store_path = args.store or synthetic_store(REPO / "runs" / "bench-service" / "metric.zarr", args.vocab_size)
    store = open_store(store_path)
    V, metric = store.vocab_size, args.metric
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, args.requests)
    pairs = rng.integers(0, V, (args.requests, N_PAIRS, 2))
    neighbor_requests = [{"method": "GET", "path": "/neighbors", "params": {"id": int(i), "k": 10, "metric": metric}} for i in ids]
    cost_requests = [{"method": "POST", "path": "/cost", "json": {"pairs": p.tolist(), "metric": metric}} for p in pairs]

    # baseline first, on a store warmed the same way the service warms its own
    store.neighbors(0, k=10, metric=metric)
    base_nb = in_process_ms(lambda i: store.neighbors(int(i), k=10, metric=metric), [(i,) for i in ids])
    base_cost = in_process_ms(lambda p: store.pair_costs(p[:, 0], p[:, 1], metric), [(p,) for p in pairs])

    port = free_port()
    t0 = time.perf_counter()
    server = start_server(Path(store_path), port)
    startup = time.perf_counter() - t0
    try:
        base_url = f"http://127.0.0.1:{port}"
        run_load(base_url, neighbor_requests[: min(200, args.requests)], min(args.concurrency, 50))  # connections, caches
        n_serial = min(SERIAL_REQUESTS, args.requests)
        loads = {(endpoint, c): run_load(base_url, reqs[: n_serial if c == 1 else None], c)
                 for endpoint, reqs in (("GET /neighbors", neighbor_requests), ("POST /cost", cost_requests))
                 for c in (1, args.concurrency)}
    finally:
        server.terminate()
        server.wait(timeout=30)

    baselines = {"GET /neighbors": base_nb, "POST /cost": base_cost}
    rows = []
    for (endpoint, concurrency), load in loads.items():
        base, n = baselines[endpoint], len(load["client_ms"])
        rows.append({
            "endpoint": endpoint, "concurrency": concurrency, "requests": n, "errors": load["errors"],
            "client_p50_ms": pct(load["client_ms"], 50), "client_p99_ms": pct(load["client_ms"], 99),
            "requests_per_s": n / load["wall_s"],
            "server_p50_ms": pct(load["server_ms"], 50), "server_p99_ms": pct(load["server_ms"], 99),
            "server_cpu_p50_ms": pct(load["cpu_ms"], 50), "server_cpu_p99_ms": pct(load["cpu_ms"], 99),
            "in_process_p50_ms": pct(base, 50), "in_process_p99_ms": pct(base, 99),
            "client_over_in_process_p50": pct(load["client_ms"], 50) / pct(base, 50),
            "server_over_in_process_p50": pct(load["server_ms"], 50) / pct(base, 50),
        })
    target = next(r for r in rows if r["endpoint"] == "GET /neighbors" and r["concurrency"] == args.concurrency)["server_p99_ms"] <= 10.0
    m = machine_info()
    m["load_average_1min_after"] = os.getloadavg()[0]
    payload = {
        "store": str(store_path) if args.store else f"synthetic V={V}, d=32, knn k=64 (hnsw)",
        "vocab_size": V, "metric": metric, "pairs_per_cost_request": N_PAIRS, "server_startup_s": startup,
        "target": "GET /neighbors server-side p99 <= 10 ms at 200 concurrent clients", "target_met": target,
        "rows": rows, "machine": m,
    }
    lines = [
        f"# Service latency: V = {V:,}, metric {metric}, 1 and {args.concurrency} concurrent clients",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (load average {m['load_average_1min_after']:.1f} at the end: noisy), and the load generator runs on the same "
        f"cores. One uvicorn worker (asyncio + h11), loopback, access log off. POST /cost carries {N_PAIRS} pairs per request. "
        "Server = the `Server-Timing` header: app wall time (backlog excluded) and the server thread's CPU time "
        "meanwhile, which descheduling by other jobs does not inflate; in-process = the same query on `MetricStore`.",
        "",
        "| endpoint | clients | requests | client p50 ms | client p99 ms | req/s | server p50 ms | server p99 ms | server CPU p99 ms | in-process p50 ms | in-process p99 ms | client p50 / in-process | server p50 / in-process | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['endpoint']} | {r['concurrency']} | {r['requests']} | {r['client_p50_ms']:.2f} | {r['client_p99_ms']:.2f} | "
            f"{r['requests_per_s']:.0f} | {r['server_p50_ms']:.2f} | {r['server_p99_ms']:.2f} | {r['server_cpu_p99_ms']:.2f} | {r['in_process_p50_ms']:.3f} | "
            f"{r['in_process_p99_ms']:.3f} | {r['client_over_in_process_p50']:.0f}× | {r['server_over_in_process_p50']:.1f}× | {r['errors']} |"
        )
    lines += [
        "",
        f"Target (neighbours p99 ≤ 10 ms server-side at {args.concurrency} concurrent clients): {'met' if target else 'NOT met'}.",
        f"With {args.concurrency} clients the client-side latency is mostly waiting in the server's backlog "
        "(≈ clients / throughput); the one-client rows give the round trip of an unloaded server.",
        "",
    ]
    table = "\n".join(lines)
    write_results(NAME, payload, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
