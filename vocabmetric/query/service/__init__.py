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
``GET  /openapi.json`` the schema (limits, metrics and error bodies included); ``/docs``
=====================  ==============================================================

Every token in an answer — ``query`` and each of ``neighbors`` (GET/POST /neighbors),
``a`` and ``b`` (GET /cost) — is ``{"id", "text", "provenance"}`` (neighbours add ``cost``):
``provenance`` says how it got its vector, one of :data:`~vocabmetric.vocab.provenance.PROVENANCE`
(``"trained"``, ``"borrowed"``, ``"composed"``, ``"none"``), looked up in a (V,) uint8 array
held in memory. GET /info counts them (``embeddings.provenance``).

How a token given as a string is read (``token=``, ``a=``, ``b=``, and strings in
``pairs``): exactly as :meth:`MetricStore.resolve` reads it — the token whose text it is
(leading space included: ``token=%20beautiful``); an all-digit string is read as an id
*only when no token has that text* (byte-level BPE vocabularies have tokens "1", "12", …),
and only ASCII digits make an id ("٣", "１２", "①" are texts).
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
limit_exceeded     422     ``k`` outside [1, max_k], or more work than ``max_work`` cost
                           evaluations (ids × k stored, ids × V exact, pairs)
request_timeout    408     a body not all there ``body_timeout`` s after the headers
batch_too_large    413     more than ``max_batch`` ids / ``max_pairs`` pairs, or a body
                           over ``max_body_bytes`` (counted as it arrives, chunked too)
invalid_request    422     a parameter of the wrong type or shape
malformed_json     400     a body that is not JSON
no_projection      404     GET /projection on a store built without the 2-D map
not_found          404     an unknown path
method_not_allowed 405     a known path, another method (``Allow`` lists the methods)
=================  ======  ===========================================================

Slow or greedy clients: headers within ``HEADER_TIMEOUT`` s, the body within
``BODY_TIMEOUT`` s, idle keep-alive connections closed after ``KEEP_ALIVE_TIMEOUT`` s, at
most ``LIMIT_CONCURRENCY`` connections per worker (beyond: uvicorn's plain 503).

Modules: ``_schema`` (limits, request/response models, errors), ``_app`` (the app and its
handlers, ``serve``), ``_errors`` (errors as JSON), ``_middleware`` (timing, the body's size
limit and deadline), ``_openapi`` (limits in the schema), ``_server`` (uvicorn: protocol,
TCP_NODELAY, timeouts), ``projection`` (the binary 2-D map), ``client``.
The app's names load on first use: FastAPI is the ``serve`` extra, and the client needs
only httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._util.lazy import lazy_exports
from ._schema import (
    BODY_TIMEOUT as BODY_TIMEOUT,
    HEADER_TIMEOUT as HEADER_TIMEOUT,
    KEEP_ALIVE_TIMEOUT as KEEP_ALIVE_TIMEOUT,
    LIMIT_CONCURRENCY as LIMIT_CONCURRENCY,
    MAX_BATCH as MAX_BATCH,
    MAX_BODY_BYTES as MAX_BODY_BYTES,
    MAX_K as MAX_K,
    MAX_PAIRS as MAX_PAIRS,
    MAX_WORK as MAX_WORK,
)
from .client import Client as Client
from .projection import (
    PROJECTION_FORMAT as PROJECTION_FORMAT,
    decode_projection as decode_projection,
    projection_bytes as projection_bytes,
)

if TYPE_CHECKING:
    from ._app import FACTORY as FACTORY, STORE_ENV as STORE_ENV, create_app as create_app, serve as serve
    from ._server import uvicorn_config as uvicorn_config

#: Names re-exported on first access, each from its module (``_app`` imports FastAPI,
#: ``_server`` uvicorn); ``uvicorn_config`` is how the service runs any ASGI app.
_LAZY = {"FACTORY": "_app", "STORE_ENV": "_app", "create_app": "_app", "serve": "_app", "uvicorn_config": "_server"}

__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "KEEP_ALIVE_TIMEOUT", "LIMIT_CONCURRENCY", "MAX_BATCH", "MAX_BODY_BYTES",
           "MAX_K", "MAX_PAIRS", "MAX_WORK", "Client", "PROJECTION_FORMAT",
           "decode_projection", "projection_bytes", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
