"""The FastAPI app: one store opened at startup, a handler per endpoint, and `serve`.

Each handler reads the app's :class:`ServiceState` (``request.app.state.service``): the open
store and the limits, fixed when the app is made. Nothing the client sends is used as a path.

Cost amplification: a request's work — ids × k for a stored metric, ids × V for an exact
one (``l2``/``tree``), its pairs for POST /cost — is at most ``max_work`` cost evaluations
(``MAX_WORK``); beyond, a 422 that states the limit.

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
import json
import logging
import os
import re
import sys
import time
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ...vocab.provenance import PROVENANCE
from ...errors import StoreError, VocabMetricError
from ...store import EXACT_METRICS, TREE, MetricStore, open_store
from ._errors import add_error_handlers
from ._middleware import TimingAndBodyLimit
from ._schema import (
    BODY_TIMEOUT, HEADER_TIMEOUT, LIMIT_CONCURRENCY, MAX_BATCH, MAX_BODY_BYTES, MAX_K, MAX_PAIRS, MAX_WORK,
    CostBatchRequest, CostBatchResponse, CostResponse, HealthResponse, InfoResponse, NeighborsBatchRequest,
    NeighborsBatchResponse, NeighborsResponse, RequestError, error_responses,
)
from ._openapi import ERROR_TABLE, PROVENANCE_NOTE, openapi_for
from ._server import FACTORY as FACTORY, OPTIONS_ENV, STORE_ENV as STORE_ENV, uvicorn_config
from .projection import projection_bytes

LOG = logging.getLogger(__name__)

INLINE_IDS = 16  # a POST /neighbors batch of a stored metric up to this size runs in the event loop
INLINE_PAIRS = 4096  # a POST /cost batch up to this size runs in the event loop
STATIC = Path(__file__).parent / "static"
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
    """What every request reads, fixed at startup: the store, the limits, the 2-D map's body,
    and every token's provenance code (V bytes, one uint8 code each: a lookup per token, no store read)."""

    def __init__(self, store: MetricStore, *, max_k: int, max_batch: int, max_pairs: int, max_body_bytes: int,
                 max_work: int):
        self.store, self.vocab_size = store, store.vocab_size
        self.max_k, self.max_batch, self.max_pairs, self.max_work = max_k, max_batch, max_pairs, max_work
        self.limits = {"max_k": max_k, "max_batch": max_batch, "max_pairs": max_pairs, "max_body_bytes": max_body_bytes,
                       "max_work": max_work}
        #: metrics whose neighbours are stored rows (O(k) to answer), not computed over V
        self.stored = {metric for metric in store.metrics if metric not in EXACT_METRICS and metric != TREE}
        self.projection = projection_bytes(store)
        #: bytes, not the numpy array: indexing one gives an int in ~70 ns, a numpy scalar ~250 ns
        self.provenance = store.provenance.tobytes()
        self.example = example_token(store)

    def check_metric(self, metric: str) -> None:
        if metric not in self.store.metrics:
            raise RequestError(400, "unknown_metric", f"unknown metric {metric!r}; this store has: {', '.join(self.store.metrics)}")

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise RequestError(422, "limit_exceeded", f"k={k} is outside [1, {self.max_k}]; ask for fewer neighbours")

    def check_work(self, n_ids: int, k: int, metric: str) -> None:
        """A 422 when ``n_ids`` queries of ``k`` neighbours under ``metric`` exceed ``max_work``."""
        per_id = k if metric in self.stored else self.vocab_size
        if n_ids * per_id <= self.max_work:
            return
        each = f"k={k} neighbours" if metric in self.stored else f"an exact scan of all {self.vocab_size:,} tokens ({metric})"
        fewer = (f"send at most {self.max_work // per_id} ids per request" if self.max_work >= per_id else
                 f"use a stored metric ({', '.join(sorted(self.stored))})")
        raise RequestError(422, "limit_exceeded", f"{n_ids} ids x {each} = {n_ids * per_id:,} cost evaluations exceeds "
                           f"the limit of {self.max_work:,} per request; {fewer}")

    def out_of_range(self, where: str, i: int) -> RequestError:
        return RequestError(400, "bad_token", f"{where}: token id {shown_int(i)} is out of range [0, {self.vocab_size})")

    def check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        """``ids`` as int64, each checked in [0, V) first (a JSON integer may exceed int64)."""
        for n, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise self.out_of_range(f"{what}[{n}]", i)
        return np.asarray(ids, dtype=np.int64)

    def token(self, i: int) -> dict:
        return {"id": i, "text": self.store.token_text(i), "provenance": PROVENANCE[self.provenance[i]]}

    def neighbors_of(self, i: int, k: int, metric: str) -> dict:
        rows, codes = self.store.neighbors(i, k=k, metric=metric), self.provenance
        return {"query": self.token(i), "metric": metric, "k": k,
                "neighbors": [{"id": n.id, "text": n.text, "cost": n.cost, "provenance": PROVENANCE[codes[n.id]]}
                              for n in rows]}

    def pair_ids(self, pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
        """(n, 2) int64 ids of ``pairs``; integers are checked in one pass, strings resolved."""
        flat = [t for p in pairs for t in p]
        ids = None
        if all(type(t) is int for t in flat):
            try:
                ids = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
            except OverflowError:  # an integer beyond int64: found below
                pass
        if ids is None:
            ids = np.empty((len(pairs), 2), dtype=np.int64)
            for n, (a, b) in enumerate(pairs):
                for col, t in enumerate((a, b)):
                    if isinstance(t, int) and not 0 <= t < self.vocab_size:
                        raise self.out_of_range(f"pairs[{n}][{col}]", t)
                    ids[n, col] = t if isinstance(t, int) else self.store.resolve(t)
        bad = np.argwhere((ids < 0) | (ids >= self.vocab_size))
        if len(bad):
            n, col = bad[0]
            raise self.out_of_range(f"pairs[{n}][{col}]", int(ids[n, col]))
        return ids


def shown_int(i: int) -> str:
    """An integer for a message: in full, or its size when it is too long to read."""
    return str(i) if -(2**63) <= i < 2**63 else f"({'a negative' if i < 0 else 'an'} integer of {i.bit_length()} bits, beyond int64)"


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
    out = relative_paths(out, s.store.path.parent)
    return {**out, "example": s.example, "store": s.store.path.name, "vocab_size": s.vocab_size, "fingerprint": s.store.fingerprint,
            "limits": s.limits}


_ABSOLUTE = re.compile(r"^(?P<kind>[a-z]\w*:)?(?P<path>/|[A-Za-z]:[\\/]|~/)")


def relative_paths(value: Any, base: Path) -> Any:
    """``value`` (the store's info, nested dicts and lists) with every absolute path made
    relative to ``base`` (the store's build directory) when under it, else cut to its file
    name: ``"hf:/srv/models/tokenizer.json"`` → ``"hf:tokenizer.json"``. The server's
    filesystem layout stays private. O(size of the info)."""
    if isinstance(value, dict):
        return {k: relative_paths(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, base) for v in value]
    if not isinstance(value, str):
        return value
    match = _ABSOLUTE.match(value)
    if not match:
        return value
    kind, path = match.group("kind") or "", PurePath(value[len(match.group("kind") or ""):])
    try:
        return kind + path.relative_to(base).as_posix()
    except ValueError:
        return kind + path.name


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
        s.check_work(1, k, metric)
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
    ids = s.check_ids(body.ids, "ids")
    s.check_work(len(ids), body.k, body.metric)

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
    if len(body.pairs) > s.max_work:
        raise RequestError(422, "limit_exceeded", f"{len(body.pairs):,} pairs exceed the limit of {s.max_work:,} cost "
                           "evaluations per request; split them")
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


# -- the app -----------------------------------------------------------------------------------
def warm(store: MetricStore) -> None:
    """Load every array a request reads, so the first request is as fast as the rest."""
    t0 = time.perf_counter()
    for metric in store.metrics:
        store.neighbors(0, k=1, metric=metric)  # operator / tree / normalized embeddings, texts
        store.pair_costs(0, 0, metric)  # the cap, even when token 0 has no neighbours
    store.provenance  # noqa: B018  (read once: requests index it)
    try:
        store.resolve("\x00warm")  # builds the text → ids table
    except VocabMetricError:
        pass
    LOG.info("warmed %s in %.2f s", store.path, time.perf_counter() - t0)


#: Tokens the explorer opens on, the first one the store places; else a frequent word.
EXAMPLES = (" London", " Paris", " beautiful", " error", " water")


def example_token(store: MetricStore) -> dict | None:
    """``{"id", "text"}`` of the token the explorer opens on: the first of :data:`EXAMPLES`
    with a vector, else the most frequent placed word of 6+ letters after a space; None when
    there is none. O(V log V) once, at startup."""
    for text in EXAMPLES:
        ids = store.ids_of_text(text)
        if len(ids) == 1 and store.usable[ids[0]]:
            return {"id": ids[0], "text": text}
    for i in np.argsort(-store.counts, kind="stable")[:20000]:
        text = store.token_text(i)
        if store.usable[i] and text[:1] == " " and text[1:].isalpha() and len(text) > 6 and store.ids_of_text(text) == [int(i)]:
            return {"id": int(i), "text": text}
    return None


def provenance_summary(store: MetricStore) -> str:
    """``26013 trained, 0 borrowed, 70000 composed, 4144 none``: the store's tokens per provenance."""
    counts = store.info()["embeddings"]["provenance"]
    return ", ".join(f"{counts[name]} {name}" for name in PROVENANCE[1:] + PROVENANCE[:1])  # none last


def create_app(
    store_path: str | os.PathLike,
    *,
    max_k: int = MAX_K,
    max_batch: int = MAX_BATCH,
    max_pairs: int = MAX_PAIRS,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_work: int = MAX_WORK,
    body_timeout: float = BODY_TIMEOUT,
):
    """The FastAPI app serving the store at ``store_path`` (opened once, read-only, warmed).

    Raises :class:`StoreError` at once for a missing or unfinished store.
    """
    store = open_store(store_path)
    warm(store)
    app = FastAPI(
        title="vocabmetric ground-cost service",
        version=store.attrs.get("vocabmetric_version", "?"),
        description=DESCRIPTION + f"\n\nStore `{store.path.name}`: {store.vocab_size} token ids "
        f"({provenance_summary(store)}), metrics {', '.join(store.metrics)}.\n\n" + PROVENANCE_NOTE + ERROR_TABLE,
    )
    app.state.store = store
    state = app.state.service = ServiceState(store, max_k=max_k, max_batch=max_batch, max_pairs=max_pairs,
                                             max_body_bytes=max_body_bytes, max_work=max_work)
    app.add_middleware(TimingAndBodyLimit, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    add_error_handlers(app)

    app.get("/healthz", response_model=HealthResponse, tags=["service"])(healthz)
    app.get("/info", response_model=InfoResponse, tags=["service"])(info)
    app.get("/neighbors", response_model=NeighborsResponse, tags=["queries"],
            responses=error_responses(400, 404, 422))(neighbors_get_for(max_k))
    app.post("/neighbors", response_model=NeighborsBatchResponse, tags=["queries"],
             responses=error_responses(400, 408, 413, 422))(neighbors_post)
    app.get("/cost", response_model=CostResponse, tags=["queries"], responses=error_responses(400, 404, 422))(cost_get)
    app.post("/cost", response_model=CostBatchResponse, tags=["queries"],
             responses=error_responses(400, 404, 408, 413, 422))(cost_post)
    app.get("/projection", tags=["explorer"], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "see projection_bytes"},
                       **error_responses(404)})(projection_get)
    app.get("/", include_in_schema=False)(page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.openapi = openapi_for(app, state)
    return app


def server_app(store_path: str | os.PathLike, **options):
    """``create_app``, then ``gc.freeze()``: the store's text tables are ~V long-lived Python
    containers that every full collection would walk again (~0.2 s at V = 100k, a pause
    for every request in flight); frozen, the collector skips them. For server processes."""
    app = create_app(store_path, **options)
    gc.freeze()
    return app


def app_from_env():
    """App factory for ``uvicorn --factory`` and several workers: the store from
    $VOCABMETRIC_STORE, ``create_app``'s options from $VOCABMETRIC_SERVICE_OPTIONS (JSON)."""
    path = os.environ.get(STORE_ENV)
    if not path:
        raise StoreError(f"set {STORE_ENV} to the store to serve")
    return server_app(path, **json.loads(os.environ.get(OPTIONS_ENV) or "{}"))


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info", *, header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
          limit_concurrency: int = LIMIT_CONCURRENCY, access_log: bool = True) -> None:
    """Run the service with uvicorn until interrupted (``workers`` processes, one store each),
    under :func:`~vocabmetric.query.service._server.uvicorn_config` (TCP_NODELAY, timeouts, caps).

    Raises :class:`StoreError` before serving for a store that fails to open.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    options = {"body_timeout": body_timeout}
    settings = dict(host=host, port=port, workers=workers, log_level=log_level, header_timeout=header_timeout,
                    limit_concurrency=limit_concurrency, access_log=access_log)
    if workers <= 1:
        server = uvicorn.Server(uvicorn_config(server_app(store_path, **options), **settings))
        server.run()
        if not server.started:
            sys.exit(3)  # uvicorn's startup failure (the port is taken, ...); it logged why
        return
    warm(open_store(store_path))  # a clear error (a damaged array too) before the workers start
    os.environ[STORE_ENV] = str(Path(store_path).resolve())
    os.environ[OPTIONS_ENV] = json.dumps(options)
    config = uvicorn_config(FACTORY, factory=True, **settings)
    Multiprocess(config, sockets=[config.bind_socket()]).run()
