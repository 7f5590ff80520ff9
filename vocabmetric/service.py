"""The HTTP ground-cost service (FastAPI) and its Python client.

``vocabmetric serve STORE`` opens one store read-only and answers, as JSON:

=====================  ==============================================================
``GET  /healthz``      liveness: ``{"status": "ok", "vocab_size", "fingerprint"}``
``GET  /info``         tokenizer, corpus, embeddings, and every metric with its k and cap
``GET  /neighbors``    ``?token=TEXT`` or ``?id=ID`` (exactly one), ``&k=10&metric=knn``
``POST /neighbors``    ``{"ids": [..], "k": 10, "metric": "knn"}``, at most ``max_batch`` ids
``GET  /cost``         ``?a=&b=&metric=l2``; ``a``/``b`` are texts or ids (see below)
``POST /cost``         ``{"pairs": [[a, b], ..], "metric": "l2"}``, at most ``max_pairs``
``GET  /projection``   the store's 2-D map, binary (see :func:`projection_bytes`)
``GET  /``             the explorer page (``static/``: plain HTML/JS/CSS using the above)
``GET  /openapi.json`` the schema; ``/docs`` renders it
=====================  ==============================================================

How a token given as a string is read (``token=``, ``a=``, ``b=``, and strings in
``pairs``): exactly as :meth:`MetricStore.resolve` reads it — the token whose text it is
(leading space included: ``token=%20beautiful``); an all-digit string is read as an id
*only when no token has that text* (byte-level BPE vocabularies have tokens "1", "12", …).
To name an id without that ambiguity, use ``id=`` (GET /neighbors) or a JSON integer
(POST /cost, POST /neighbors).

Every error is a 4xx (5xx only for a bug) with the body
``{"error": {"type": "...", "message": "..."}}``; the message names the bad value:

=================  ======  ===========================================================
type               status  cause
=================  ======  ===========================================================
unknown_metric     400     a metric the store does not hold (the message lists them)
bad_token          400     an id out of range, or both/neither of ``token`` and ``id``
token_not_found    404     a text that matches no id, or several (candidates listed)
limit_exceeded     422     ``k`` outside [1, max_k]
batch_too_large    413     more than ``max_batch`` ids / ``max_pairs`` pairs, or a body
                           over ``max_body_bytes``
invalid_request    422     a parameter of the wrong type or shape
malformed_json     400     a body that is not JSON
no_projection      404     GET /projection on a store built without the 2-D map
not_found          404     an unknown path (405: a known path, another method)
=================  ======  ===========================================================

Nothing the client sends is used as a path: the store path is fixed when the app is made.

Concurrency: work of size O(k) — a stored metric's neighbours, one cost, a batch of up to
``INLINE_PAIRS`` pairs — runs in the event loop, where a thread hop would cost more than the
work; O(V) work (``l2``/``tree`` neighbours, large batches, ``/info``) runs in the server's
threadpool so that it never stalls the loop. The store's arrays are loaded at startup
(``_warm``), so requests only read immutable numpy arrays; the store's own lock guards its
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
from typing import Any, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .errors import ConfigError, StoreError, TokenizerError, TokenNotFound, VocabMetricError
from .store import EXACT_METRICS, TREE, MetricStore, Neighbor, open_store

LOG = logging.getLogger(__name__)

MAX_K = 1024
MAX_BATCH = 1024
MAX_PAIRS = 100_000
MAX_BODY_BYTES = 8 << 20
INLINE_IDS = 16  # a POST /neighbors batch of a stored metric up to this size runs in the event loop
INLINE_PAIRS = 4096  # a POST /cost batch up to this size runs in the event loop
STORE_ENV = "VOCABMETRIC_STORE"  # the store of the app factory used with several workers
STATIC = Path(__file__).parent / "static"
PROJECTION_FORMAT = "vocabmetric.projection/1"
#: The explorer page may load only its own scripts and styles: token text that reached the
#: DOM as HTML by mistake still could not run a script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


# -- the service's own errors: what went wrong, as an HTTP status and a type ---------------
class _RequestError(Exception):
    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def _error_of(exc: VocabMetricError) -> _RequestError:
    """The HTTP error of a store error the client caused."""
    if isinstance(exc, TokenNotFound):
        return _RequestError(404, "token_not_found", str(exc))
    if isinstance(exc, TokenizerError):
        return _RequestError(400, "bad_token", str(exc))
    return _RequestError(400, "bad_request", str(exc))


# -- response and request models -----------------------------------------------------------
TokenRef = Union[StrictInt, StrictStr]  # a JSON integer is an id, a string is resolved


class TokenModel(BaseModel):
    id: int = Field(description="token id")
    text: str = Field(description="token text (undecodable bytes as \\xNN)")


class NeighborModel(BaseModel):
    id: int
    text: str
    cost: float


class NeighborsResponse(BaseModel):
    query: TokenModel
    metric: str
    k: int = Field(description="the k asked for; fewer neighbours when the metric stores fewer")
    neighbors: list[NeighborModel] = Field(description="cheapest first, the query itself excluded")


class NeighborsBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[StrictInt] = Field(description=f"token ids, at most {MAX_BATCH} by default")
    k: StrictInt = 10
    metric: str = "knn"


class NeighborsBatchResponse(BaseModel):
    metric: str
    k: int
    results: list[NeighborsResponse] = Field(description="one per id, in order")


class CostResponse(BaseModel):
    a: TokenModel
    b: TokenModel
    metric: str
    cost: float


class CostBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[tuple[TokenRef, TokenRef]] = Field(
        description=f"[a, b] pairs; an integer is an id, a string is resolved like GET /cost; at most {MAX_PAIRS} by default"
    )
    metric: str = "l2"


class CostBatchResponse(BaseModel):
    metric: str
    costs: list[float] = Field(description="cost of each pair, in order")


class HealthResponse(BaseModel):
    status: str
    vocab_size: int
    fingerprint: str


class InfoResponse(BaseModel):
    store: str = Field(description="the store directory's name (not its full path)")
    vocab_size: int
    fingerprint: str
    schema_version: int
    vocabmetric_version: str
    created: str
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    embeddings: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = Field(description="metric name -> kind, k, cap, cap_statistic")
    limits: dict[str, int]


# -- the queries, on ids ---------------------------------------------------------------------
def _check_metric(store: MetricStore, metric: str) -> None:
    if metric not in store.metrics:
        raise _RequestError(400, "unknown_metric", f"unknown metric {metric!r}; this store has: {', '.join(store.metrics)}")


def _check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise _RequestError(422, "limit_exceeded", f"k={k} is outside [1, {max_k}]; ask for fewer neighbours")


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(bad):
        raise _RequestError(
            400, "bad_token", f"{what}[{bad[0]}]: token id {ids[bad[0]]} is out of range [0, {vocab_size})"
        )


def projection_bytes(store: MetricStore) -> bytes | None:
    """The store's 2-D map as the body of ``GET /projection``; None when the store has none.

    Layout (little-endian), for ``n`` usable tokens::

        uint32        H, the header's length in bytes
        H bytes       UTF-8 JSON {"format", "count": n, "vocab_size", "bounds": [xmin, ymin, xmax, ymax]},
                      space-padded so that the arrays start at a multiple of 4
        uint32[n]     the token ids, ascending
        uint16[n, 2]  x, y as fixed point: x = xmin + (xmax - xmin) * qx / 65535 (same for y)

    8 bytes per token (1.6 MB at n = 200k) against ~50 for JSON; 16-bit fixed point over the
    bounds is uniform where float16 would be coarse far from 0 (error ≤ extent / 131070).
    O(V) once; the service computes it at startup.
    """
    import json

    try:
        xy = store.projection2d()
    except StoreError:
        return None
    ids = np.flatnonzero(np.isfinite(xy).all(axis=1)).astype("<u4")
    pts = xy[ids].astype(np.float64)
    low = pts.min(axis=0) if len(ids) else np.zeros(2)
    high = pts.max(axis=0) if len(ids) else np.ones(2)
    extent = np.where(high > low, high - low, 1.0)
    q = np.rint((pts - low) / extent * 65535).astype("<u2")
    header = json.dumps({"format": PROJECTION_FORMAT, "count": len(ids), "vocab_size": store.vocab_size,
                         "bounds": [float(low[0]), float(low[1]), float(low[0] + extent[0]), float(low[1] + extent[1])]}).encode()
    header += b" " * (-len(header) % 4)
    return np.uint32(len(header)).astype("<u4").tobytes() + header + ids.tobytes() + q.tobytes()


def decode_projection(body: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(header, ids (n,) int64, xy (n, 2) float64)`` from a ``GET /projection`` body."""
    import json

    length = int(np.frombuffer(body[:4], "<u4")[0])
    header = json.loads(body[4 : 4 + length])
    if header.get("format") != PROJECTION_FORMAT:
        raise VocabMetricError(f"not a {PROJECTION_FORMAT} body (format {header.get('format')!r})")
    n, start = header["count"], 4 + length
    ids = np.frombuffer(body, "<u4", n, start).astype(np.int64)
    q = np.frombuffer(body, "<u2", 2 * n, start + 4 * n).reshape(n, 2).astype(np.float64)
    x0, y0, x1, y1 = header["bounds"]
    return header, ids, np.array([x0, y0]) + q / 65535 * np.array([x1 - x0, y1 - y0])


def _warm(store: MetricStore) -> None:
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


# -- the app -----------------------------------------------------------------------------
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
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    store = open_store(store_path)
    _warm(store)
    V = store.vocab_size
    stored = {metric for metric in store.metrics if metric not in EXACT_METRICS and metric != TREE}
    limits = {"max_k": max_k, "max_batch": max_batch, "max_pairs": max_pairs, "max_body_bytes": max_body_bytes}
    projection = projection_bytes(store)

    app = FastAPI(
        title="vocabmetric ground-cost service",
        version=store.attrs.get("vocabmetric_version", "?"),
        description=(__doc__ or "").split("\n\n")[0] + f"\n\nStore `{store.path.name}`: {V} token ids, "
        f"metrics {', '.join(store.metrics)}.",
    )
    app.state.store = store
    app.add_middleware(_TimingAndBodyLimit, max_body_bytes=max_body_bytes)

    def error(status: int, type_: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)

    @app.exception_handler(_RequestError)
    async def _request_error(request: Request, exc: _RequestError):
        return error(exc.status, exc.type, exc.message)

    @app.exception_handler(VocabMetricError)
    async def _store_error(request: Request, exc: VocabMetricError):
        e = _error_of(exc)
        return error(e.status, e.type, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            p = next(p for p in problems if p.get("type") == "json_invalid")
            return error(400, "malformed_json", f"the request body is not valid JSON: {p.get('ctx', {}).get('error', p['msg'])}")
        return error(422, "invalid_request", "; ".join(_describe(p) for p in problems[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(exc.status_code, type_, message)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug, still answered as JSON
        LOG.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def token_model(i: int) -> dict:
        return {"id": i, "text": store.token_text(i)}

    def neighbors_of(i: int, k: int, metric: str) -> dict:
        rows = store.neighbors(i, k=k, metric=metric)
        return {"query": token_model(i), "metric": metric, "k": k,
                "neighbors": [{"id": n.id, "text": n.text, "cost": n.cost} for n in rows]}

    async def run(fn, *args, inline: bool):
        """O(k)-sized work runs in the event loop (no thread hop); O(V) work in the threadpool."""
        return fn(*args) if inline else await run_in_threadpool(fn, *args)

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz():
        return {"status": "ok", "vocab_size": V, "fingerprint": store.fingerprint}

    @app.get("/info", response_model=InfoResponse, tags=["service"])
    def info():
        out = store.info()
        out.pop("path", None)
        return {**out, "store": store.path.name, "vocab_size": V, "fingerprint": store.fingerprint, "limits": limits}

    @app.get("/neighbors", response_model=NeighborsResponse, tags=["queries"])
    async def neighbors_get(
        token: str | None = Query(None, description="token text, leading space included; all digits: an id unless a token has that text"),
        token_id: int | None = Query(None, alias="id", description="token id (exclusive with token)"),
        k: int = Query(10, description=f"how many neighbours, 1..{max_k}"),
        metric: str = Query("knn", description="a metric of the store (GET /info)"),
    ):
        """The k cheapest tokens from one token (given by ``token`` or ``id``)."""
        if (token is None) == (token_id is None):
            given = "both" if token is not None else "neither"
            raise _RequestError(400, "bad_token", f"give exactly one of token= and id= (got {given}: token={token!r}, id={token_id!r})")
        _check_metric(store, metric)
        _check_k(k, max_k)
        i = store.resolve(token if token is not None else int(token_id))
        return await run(neighbors_of, i, k, metric, inline=metric in stored)

    @app.post("/neighbors", response_model=NeighborsBatchResponse, tags=["queries"])
    async def neighbors_post(body: NeighborsBatchRequest):
        """The k cheapest tokens from each of a batch of ids."""
        if len(body.ids) > max_batch:
            raise _RequestError(413, "batch_too_large", f"a batch of {len(body.ids)} ids exceeds the limit of {max_batch}; split it")
        _check_metric(store, body.metric)
        _check_k(body.k, max_k)
        ids = np.asarray(body.ids, dtype=np.int64)
        _check_ids(ids, V, "ids")

        def answer() -> dict:
            return {"metric": body.metric, "k": body.k, "results": [neighbors_of(int(i), body.k, body.metric) for i in ids]}

        return await run(answer, inline=body.metric in stored and len(ids) <= INLINE_IDS)

    @app.get("/cost", response_model=CostResponse, tags=["queries"])
    async def cost_get(
        a: str = Query(..., description="token text or id (all digits: an id unless a token has that text)"),
        b: str = Query(..., description="token text or id"),
        metric: str = Query("l2", description="a metric of the store (GET /info)"),
    ):
        """The cost between two tokens."""
        _check_metric(store, metric)
        i, j = store.resolve(a), store.resolve(b)
        c = store.pair_costs(i, j, metric)
        return {"a": token_model(i), "b": token_model(j), "metric": metric, "cost": float(c)}

    @app.post("/cost", response_model=CostBatchResponse, tags=["queries"])
    async def cost_post(body: CostBatchRequest):
        """The cost of each of a batch of pairs, vectorized."""
        if len(body.pairs) > max_pairs:
            raise _RequestError(413, "batch_too_large", f"a batch of {len(body.pairs)} pairs exceeds the limit of {max_pairs}; split it")
        _check_metric(store, body.metric)

        def answer() -> dict:
            ids = _pair_ids(store, body.pairs)
            return {"metric": body.metric, "costs": store.pair_costs(ids[:, 0], ids[:, 1], body.metric).tolist()}

        return await run(answer, inline=len(body.pairs) <= INLINE_PAIRS)

    @app.get("/projection", tags=["explorer"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "see projection_bytes"}})
    async def projection_get():
        """The 2-D map of the usable tokens: a JSON header, uint32 ids, uint16 fixed-point x, y."""
        if projection is None:
            raise _RequestError(404, "no_projection", f"the store {store.path.name} has no 2-D map (projection2d); "
                                "rebuild it with `vocabmetric build` to get one")
        return Response(projection, media_type="application/octet-stream")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _pair_ids(store: MetricStore, pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
    """(n, 2) int64 ids of ``pairs``; integers are checked in one pass, strings resolved."""
    flat = [t for p in pairs for t in p]
    if all(type(t) is int for t in flat):
        ids = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
    else:
        ids = np.empty((len(pairs), 2), dtype=np.int64)
        for n, (a, b) in enumerate(pairs):
            for col, t in enumerate((a, b)):
                ids[n, col] = t if isinstance(t, int) else store.resolve(t)
    bad = np.argwhere((ids < 0) | (ids >= store.vocab_size))
    if len(bad):
        n, col = bad[0]
        raise _RequestError(400, "bad_token", f"pairs[{n}][{col}]: token id {ids[n, col]} is out of range [0, {store.vocab_size})")
    return ids


def _describe(problem: dict) -> str:
    """One validation problem as 'where: what (got value)', the value shortened."""
    where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body",)) or "request"
    got = repr(problem.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{where}: {problem.get('msg')} (got {got})"


class _TimingAndBodyLimit:
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
            from fastapi.responses import JSONResponse

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


def _server_app(store_path: str | os.PathLike):
    """``create_app``, then ``gc.freeze()``: the store's text tables are ~V long-lived Python
    containers that every full collection would walk again (~0.2 s at V = 100k, a pause
    for every request in flight); frozen, the collector skips them. For server processes."""
    app = create_app(store_path)
    gc.freeze()
    return app


def _app_from_env():
    """App factory for ``uvicorn --factory`` and several workers: the store from $VOCABMETRIC_STORE."""
    path = os.environ.get(STORE_ENV)
    if not path:
        raise StoreError(f"set {STORE_ENV} to the store to serve")
    return _server_app(path)


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info") -> None:
    """Run the service with uvicorn until interrupted (``workers`` processes, one store each)."""
    import uvicorn

    if workers <= 1:
        uvicorn.run(_server_app(store_path), host=host, port=port, log_level=log_level)
        return
    open_store(store_path)  # a clear error before the workers start
    os.environ[STORE_ENV] = str(Path(store_path).resolve())
    uvicorn.run("vocabmetric.service:_app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level)


# -- the client ------------------------------------------------------------------------------
_ERRORS: dict[str, type[VocabMetricError]] = {
    "token_not_found": TokenNotFound,
    "bad_token": TokenizerError,
    "unknown_metric": StoreError,
    "limit_exceeded": ConfigError,
    "batch_too_large": ConfigError,
    "invalid_request": ConfigError,
    "malformed_json": ConfigError,
    "no_projection": StoreError,
}


class Client:
    """A small Python client of the service (httpx, one connection pool).

    >>> with Client("http://127.0.0.1:8000") as client:                # doctest: +SKIP
    ...     client.neighbors(" beautiful", k=3, metric="knn")
    [Neighbor(id=24415, text=' gorgeous', cost=0.61), ...]

    An ``int`` token is sent as an id, a ``str`` as a text. A 4xx raises the
    :mod:`vocabmetric.errors` class of the server's error type (``TokenNotFound``,
    ``TokenizerError``, ``StoreError``, ``ConfigError``) with the server's message;
    ``.status`` and ``.type`` are set on the exception.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The response of a 2xx/3xx; a 4xx/5xx raises the error class of its type."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise VocabMetricError(f"cannot reach the service at {self.base_url}: {exc}; start it with `vocabmetric serve STORE`") from exc
        if response.status_code < 400:
            return response
        try:
            err = response.json()["error"]
            type_, message = err["type"], err["message"]
        except Exception:  # not our error body (a proxy, or not this service)
            type_, message = "http_error", f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}"
        exc = _ERRORS.get(type_, VocabMetricError)(message)
        exc.status, exc.type = response.status_code, type_  # type: ignore[attr-defined]
        raise exc

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def info(self) -> dict:
        return self._call("GET", "/info")

    def neighbors(self, token: int | str, k: int = 10, metric: str = "knn") -> list[Neighbor]:
        """The ``k`` cheapest tokens from ``token`` (an id or a text)."""
        query = {"id": int(token)} if isinstance(token, (int, np.integer)) else {"token": token}
        return _neighbors(self._call("GET", "/neighbors", params={**query, "k": k, "metric": metric}))

    def neighbors_batch(self, ids: Sequence[int], k: int = 10, metric: str = "knn") -> list[list[Neighbor]]:
        """The ``k`` cheapest tokens from each id, in one request."""
        body = {"ids": [int(i) for i in ids], "k": k, "metric": metric}
        return [_neighbors(r) for r in self._call("POST", "/neighbors", json=body)["results"]]

    def projection(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,), xy (n, 2))``: the store's 2-D map (16-bit fixed point, see :func:`projection_bytes`)."""
        _, ids, xy = decode_projection(self._request("GET", "/projection").content)
        return ids, xy

    def cost(self, a: int | str, b: int | str, metric: str = "l2") -> float:
        """The cost between two tokens (ids stay ids: sent as JSON integers)."""
        return float(self.costs([(a, b)], metric)[0])

    def costs(self, pairs: Sequence[tuple[int | str, int | str]], metric: str = "l2") -> np.ndarray:
        """Costs of a batch of ``(a, b)`` pairs as a float32 array, in one request."""
        body = {"pairs": [[_json_token(a), _json_token(b)] for a, b in pairs], "metric": metric}
        return np.asarray(self._call("POST", "/cost", json=body)["costs"], dtype=np.float32)


def _json_token(t: int | str) -> int | str:
    return int(t) if isinstance(t, (int, np.integer)) else t


def _neighbors(response: dict) -> list[Neighbor]:
    return [Neighbor(n["id"], n["text"], n["cost"]) for n in response["neighbors"]]
