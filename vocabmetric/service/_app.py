"""The FastAPI app: one store opened at startup, a handler per endpoint, the middleware, uvicorn.

Each handler reads the app's :class:`ServiceState` (``request.app.state.service``): the open
store and the limits, fixed when the app is made. Nothing the client sends is used as a path.

Concurrency: work of size O(k) — a stored metric's neighbours, one cost, a batch of up to
``INLINE_PAIRS`` pairs — runs in the event loop, where a thread hop would cost more than the
work; O(V) work (``l2``/``tree`` neighbours, large batches, ``/info``) runs in the server's
threadpool so that it never stalls the loop. The store's arrays are loaded at startup
(``warm``), so requests only read immutable numpy arrays; the store's own lock guards its
caches should anything load later.

Cost per request: a stored metric's neighbours O(k log k); ``l2``/``tree`` neighbours are
exact over every usable token, O(V·d) / O(V·depth); a batch of n pairs O(n·k) (stored),
O(n·d) (``l2``), O(n·depth) (``tree``), all vectorized.

Every response carries ``Server-Timing: app;dur=<ms>, cpu;dur=<ms>``: the wall time from
the app taking up the request to its response headers (body validation, the query,
serialization, and any threadpool wait), and the event-loop thread's CPU time meanwhile.
Time a request spends in the server's backlog before the app takes it up is not in it;
under load that shows in the client-side latency. Server processes ``gc.freeze()`` the
warmed store, so full garbage collections do not walk its ~V text-table containers.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StoreError, VocabMetricError
from ..store import EXACT_METRICS, TREE, MetricStore, open_store
from ._schema import (
    MAX_BATCH, MAX_BODY_BYTES, MAX_K, MAX_PAIRS, CostBatchRequest, CostBatchResponse, CostResponse,
    HealthResponse, InfoResponse, NeighborsBatchRequest, NeighborsBatchResponse, NeighborsResponse,
    RequestError, error_of,
)
from .projection import projection_bytes

LOG = logging.getLogger(__name__)

INLINE_IDS = 16  # a POST /neighbors batch of a stored metric up to this size runs in the event loop
INLINE_PAIRS = 4096  # a POST /cost batch up to this size runs in the event loop
STORE_ENV = "VOCABMETRIC_STORE"  # the store of the app factory used with several workers
FACTORY = "vocabmetric.service._app:app_from_env"  # that factory, as uvicorn imports it
STATIC = Path(__file__).parent.parent / "static"
#: The first paragraph of the OpenAPI description (the package docstring's first line).
DESCRIPTION = "The HTTP ground-cost service (FastAPI) and its Python client."
#: The explorer page may load only its own scripts and styles: token text that reached the
#: DOM as HTML by mistake still could not run a script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ServiceState:
    """What every request reads, fixed at startup: the store, the limits, the 2-D map's body."""

    def __init__(self, store: MetricStore, *, max_k: int, max_batch: int, max_pairs: int, max_body_bytes: int):
        self.store, self.vocab_size = store, store.vocab_size
        self.max_k, self.max_batch, self.max_pairs = max_k, max_batch, max_pairs
        self.limits = {"max_k": max_k, "max_batch": max_batch, "max_pairs": max_pairs, "max_body_bytes": max_body_bytes}
        #: metrics whose neighbours are stored rows (O(k) to answer), not computed over V
        self.stored = {metric for metric in store.metrics if metric not in EXACT_METRICS and metric != TREE}
        self.projection = projection_bytes(store)

    def check_metric(self, metric: str) -> None:
        if metric not in self.store.metrics:
            raise RequestError(400, "unknown_metric", f"unknown metric {metric!r}; this store has: {', '.join(self.store.metrics)}")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise RequestError(422, "limit_exceeded", f"k={k} is outside [1, {self.max_k}]; ask for fewer neighbours")

    def check_ids(self, ids: np.ndarray, what: str) -> None:
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if len(bad):
            raise RequestError(
                400, "bad_token", f"{what}[{bad[0]}]: token id {ids[bad[0]]} is out of range [0, {self.vocab_size})"
            )

    def token(self, i: int) -> dict:
        return {"id": i, "text": self.store.token_text(i)}

    def neighbors_of(self, i: int, k: int, metric: str) -> dict:
        rows = self.store.neighbors(i, k=k, metric=metric)
        return {"query": self.token(i), "metric": metric, "k": k,
                "neighbors": [{"id": n.id, "text": n.text, "cost": n.cost} for n in rows]}

    def pair_ids(self, pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
        """(n, 2) int64 ids of ``pairs``; integers are checked in one pass, strings resolved."""
        flat = [t for p in pairs for t in p]
        if all(type(t) is int for t in flat):
            ids = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
        else:
            ids = np.empty((len(pairs), 2), dtype=np.int64)
            for n, (a, b) in enumerate(pairs):
                for col, t in enumerate((a, b)):
                    ids[n, col] = t if isinstance(t, int) else self.store.resolve(t)
        bad = np.argwhere((ids < 0) | (ids >= self.vocab_size))
        if len(bad):
            n, col = bad[0]
            raise RequestError(400, "bad_token", f"pairs[{n}][{col}]: token id {ids[n, col]} is out of range [0, {self.vocab_size})")
        return ids


def _state(request: Request) -> ServiceState:
    return request.app.state.service


async def _run(fn, *args, inline: bool):
    """O(k)-sized work runs in the event loop (no thread hop); O(V) work in the threadpool."""
    return fn(*args) if inline else await run_in_threadpool(fn, *args)


# -- the endpoints ---------------------------------------------------------------------------
async def healthz(request: Request):
    s = _state(request)
    return {"status": "ok", "vocab_size": s.vocab_size, "fingerprint": s.store.fingerprint}


def info(request: Request):
    s = _state(request)
    out = s.store.info()
    out.pop("path", None)
    return {**out, "store": s.store.path.name, "vocab_size": s.vocab_size, "fingerprint": s.store.fingerprint,
            "limits": s.limits}


def neighbors_get_for(max_k: int):
    """GET /neighbors, made per app: the description of its ``k`` names the app's ``max_k``."""

    async def neighbors_get(
        request: Request,
        token: str | None = Query(None, description="token text, leading space included; all digits: an id unless a token has that text"),
        token_id: int | None = Query(None, alias="id", description="token id (exclusive with token)"),
        k: int = Query(10, description=f"how many neighbours, 1..{max_k}"),
        metric: str = Query("knn", description="a metric of the store (GET /info)"),
    ):
        """The k cheapest tokens from one token (given by ``token`` or ``id``)."""
        if (token is None) == (token_id is None):
            given = "both" if token is not None else "neither"
            raise RequestError(400, "bad_token", f"give exactly one of token= and id= (got {given}: token={token!r}, id={token_id!r})")
        s = _state(request)
        s.check_metric(metric)
        s.check_k(k)
        i = s.store.resolve(token if token is not None else int(token_id))
        return await _run(s.neighbors_of, i, k, metric, inline=metric in s.stored)

    return neighbors_get


async def neighbors_post(request: Request, body: NeighborsBatchRequest):
    """The k cheapest tokens from each of a batch of ids."""
    s = _state(request)
    if len(body.ids) > s.max_batch:
        raise RequestError(413, "batch_too_large", f"a batch of {len(body.ids)} ids exceeds the limit of {s.max_batch}; split it")
    s.check_metric(body.metric)
    s.check_k(body.k)
    ids = np.asarray(body.ids, dtype=np.int64)
    s.check_ids(ids, "ids")

    def answer() -> dict:
        return {"metric": body.metric, "k": body.k, "results": [s.neighbors_of(int(i), body.k, body.metric) for i in ids]}

    return await _run(answer, inline=body.metric in s.stored and len(ids) <= INLINE_IDS)


async def cost_get(
    request: Request,
    a: str = Query(..., description="token text or id (all digits: an id unless a token has that text)"),
    b: str = Query(..., description="token text or id"),
    metric: str = Query("l2", description="a metric of the store (GET /info)"),
):
    """The cost between two tokens."""
    s = _state(request)
    s.check_metric(metric)
    i, j = s.store.resolve(a), s.store.resolve(b)
    c = s.store.pair_costs(i, j, metric)
    return {"a": s.token(i), "b": s.token(j), "metric": metric, "cost": float(c)}


async def cost_post(request: Request, body: CostBatchRequest):
    """The cost of each of a batch of pairs, vectorized."""
    s = _state(request)
    if len(body.pairs) > s.max_pairs:
        raise RequestError(413, "batch_too_large", f"a batch of {len(body.pairs)} pairs exceeds the limit of {s.max_pairs}; split it")
    s.check_metric(body.metric)

    def answer() -> dict:
        ids = s.pair_ids(body.pairs)
        return {"metric": body.metric, "costs": s.store.pair_costs(ids[:, 0], ids[:, 1], body.metric).tolist()}

    return await _run(answer, inline=len(body.pairs) <= INLINE_PAIRS)


async def projection_get(request: Request):
    """The 2-D map of the usable tokens: a JSON header, uint32 ids, uint16 fixed-point x, y."""
    s = _state(request)
    if s.projection is None:
        raise RequestError(404, "no_projection", f"the store {s.store.path.name} has no 2-D map (projection2d); "
                           "rebuild it with `vocabmetric build` to get one")
    return Response(s.projection, media_type="application/octet-stream")


async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


# -- errors as JSON ----------------------------------------------------------------------------
def _error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)


async def _request_error(request: Request, exc: RequestError):
    return _error(exc.status, exc.type, exc.message)


async def _store_error(request: Request, exc: VocabMetricError):
    e = error_of(exc)
    return _error(e.status, e.type, e.message)


async def _validation_error(request: Request, exc: RequestValidationError):
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        p = next(p for p in problems if p.get("type") == "json_invalid")
        return _error(400, "malformed_json", f"the request body is not valid JSON: {p.get('ctx', {}).get('error', p['msg'])}")
    return _error(422, "invalid_request", "; ".join(_describe(p) for p in problems[:5]))


async def _http_error(request: Request, exc: StarletteHTTPException):
    type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error(exc.status_code, type_, message)


async def _bug(request: Request, exc: Exception):  # a bug, still answered as JSON
    LOG.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _describe(problem: dict) -> str:
    """One validation problem as 'where: what (got value)', the value shortened."""
    where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body",)) or "request"
    got = repr(problem.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{where}: {problem.get('msg')} (got {got})"


class TimingAndBodyLimit:
    """ASGI middleware: a ``Server-Timing: app;dur=<ms>, cpu;dur=<ms>`` header on every
    response, and a 413 for a body whose Content-Length exceeds ``max_body_bytes``.

    ``app``: wall time in the app; ``cpu``: CPU time of the event-loop thread meanwhile
    (the request's own work when it runs inline; unlike ``app``, not inflated when the OS
    deschedules the server)."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            body = {"error": {"type": "batch_too_large",
                              "message": f"a request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}; split it"}}
            return await JSONResponse(body, status_code=413)(scope, receive, send)

        async def timed_send(message):
            if message["type"] == "http.response.start":
                ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.thread_time() - cpu0) * 1e3
                timing = f"app;dur={ms:.3f}, cpu;dur={cpu_ms:.3f}".encode()
                message = {**message, "headers": list(message.get("headers", [])) + [(b"server-timing", timing)]}
            await send(message)

        await self.app(scope, receive, timed_send)


# -- the app -----------------------------------------------------------------------------------
def warm(store: MetricStore) -> None:
    """Load every array a request reads, so the first request is as fast as the rest."""
    t0 = time.perf_counter()
    for metric in store.metrics:
        store.neighbors(0, k=1, metric=metric)  # operator / tree / normalized embeddings, texts
        store.pair_costs(0, 0, metric)  # the cap, even when token 0 has no neighbours
    try:
        store.resolve("\x00warm")  # builds the text → ids table
    except VocabMetricError:
        pass
    LOG.info("warmed %s in %.2f s", store.path, time.perf_counter() - t0)


def create_app(
    store_path: str | os.PathLike,
    *,
    max_k: int = MAX_K,
    max_batch: int = MAX_BATCH,
    max_pairs: int = MAX_PAIRS,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    """The FastAPI app serving the store at ``store_path`` (opened once, read-only, warmed).

    Raises :class:`StoreError` at once for a missing or unfinished store.
    """
    store = open_store(store_path)
    warm(store)
    app = FastAPI(
        title="vocabmetric ground-cost service",
        version=store.attrs.get("vocabmetric_version", "?"),
        description=DESCRIPTION + f"\n\nStore `{store.path.name}`: {store.vocab_size} token ids, "
        f"metrics {', '.join(store.metrics)}.",
    )
    app.state.store = store
    app.state.service = ServiceState(store, max_k=max_k, max_batch=max_batch, max_pairs=max_pairs,
                                     max_body_bytes=max_body_bytes)
    app.add_middleware(TimingAndBodyLimit, max_body_bytes=max_body_bytes)
    for exc_class, handler in ((RequestError, _request_error), (VocabMetricError, _store_error),
                               (RequestValidationError, _validation_error), (StarletteHTTPException, _http_error),
                               (Exception, _bug)):
        app.add_exception_handler(exc_class, handler)

    app.get("/healthz", response_model=HealthResponse, tags=["service"])(healthz)
    app.get("/info", response_model=InfoResponse, tags=["service"])(info)
    app.get("/neighbors", response_model=NeighborsResponse, tags=["queries"])(neighbors_get_for(max_k))
    app.post("/neighbors", response_model=NeighborsBatchResponse, tags=["queries"])(neighbors_post)
    app.get("/cost", response_model=CostResponse, tags=["queries"])(cost_get)
    app.post("/cost", response_model=CostBatchResponse, tags=["queries"])(cost_post)
    app.get("/projection", tags=["explorer"], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "see projection_bytes"}})(projection_get)
    app.get("/", include_in_schema=False)(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def server_app(store_path: str | os.PathLike):
    """``create_app``, then ``gc.freeze()``: the store's text tables are ~V long-lived Python
    containers that every full collection would walk again (~0.2 s at V = 100k, a pause
    for every request in flight); frozen, the collector skips them. For server processes."""
    app = create_app(store_path)
    gc.freeze()
    return app


def app_from_env():
    """App factory for ``uvicorn --factory`` and several workers: the store from $VOCABMETRIC_STORE."""
    path = os.environ.get(STORE_ENV)
    if not path:
        raise StoreError(f"set {STORE_ENV} to the store to serve")
    return server_app(path)


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted (``workers`` processes, one store each)."""
    import uvicorn

    if workers <= 1:
        uvicorn.run(server_app(store_path), host=host, port=port, log_level=log_level)
        return
    open_store(store_path)  # a clear error before the workers start
    os.environ[STORE_ENV] = str(Path(store_path).resolve())
    uvicorn.run(FACTORY, factory=True, host=host, port=port, workers=workers, log_level=log_level)
