"""Every error as the JSON body ``{"error": {"type", "message"}}``: the handlers of the app.

A :class:`RequestError` is sent as it is; a store error the client caused becomes its 4xx
(:func:`error_of`); FastAPI's validation errors become ``invalid_request`` (422) or
``malformed_json`` (400); a 405 carries an ``Allow`` header that lists every method of the
path; anything else is a bug: logged with its traceback, answered as a 500.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ...errors import VocabMetricError
from ._middleware import error_response
from ._schema import RequestError, error_of

LOG = logging.getLogger(__name__)

_error = error_response


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


def allowed_methods(request: Request, exc: StarletteHTTPException) -> str:
    """Every method some route serves at the request's path (a 405's ``Allow``): Starlette's
    own header names only the first route that matched the path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods)) if methods else (exc.headers or {}).get("Allow", "GET, HEAD")


async def _http_error(request: Request, exc: StarletteHTTPException):
    # FastAPI's 400: a body its JSON parser took but could not turn into Python (an integer of 5,000 digits)
    type_ = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    headers = {"Allow": allowed_methods(request, exc)} if exc.status_code == 405 else None
    if headers:
        message += f"; this path allows {headers['Allow']}"
    return _error(exc.status_code, type_, message, headers)


async def _bug(request: Request, exc: Exception):  # a bug, still answered as JSON
    LOG.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


def _describe(problem: dict) -> str:
    """One validation problem as 'where: what (got value)', the value shortened."""
    where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("body",)) or "request"
    got = repr(problem.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{where}: {problem.get('msg')} (got {got})"


def add_error_handlers(app) -> None:
    for exc_class, handler in ((RequestError, _request_error), (VocabMetricError, _store_error),
                               (RequestValidationError, _validation_error), (StarletteHTTPException, _http_error),
                               (Exception, _bug)):
        app.add_exception_handler(exc_class, handler)
