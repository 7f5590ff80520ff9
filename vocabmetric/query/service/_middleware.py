"""The service's ASGI middleware: a ``Server-Timing`` header, and the request body read
under a size limit and a deadline before any handler sees it.

The body is counted as it arrives (``Content-Length`` is only a hint: a chunked body has
none), so a client cannot make the server hold more than ``max_body_bytes`` of it; past
the limit the answer is a 413 and the connection is closed without reading the rest. A body
that does not arrive within ``body_timeout`` seconds of the request's headers is a 408.
Cost: one pass over the body's chunks (O(bytes)), held at most ``max_body_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse

LOG = logging.getLogger(__name__)

#: Sent with a 408/413: the rest of the body is not read, so the connection cannot be reused.
CLOSE = {"connection": "close"}


class BodyTooLarge(Exception):
    """More than ``max_body_bytes`` arrived (``size``: the bytes counted when it stopped)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The service's error body ``{"error": {"type", "message"}}`` with ``status``."""
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


async def read_body(receive, max_body_bytes: int) -> list[dict] | None:
    """The request's body messages, the last one without ``more_body``; None when the client
    disconnected first. Raises :class:`BodyTooLarge` as soon as the count passes the limit."""
    messages, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        size += len(message.get("body", b""))
        if size > max_body_bytes:
            raise BodyTooLarge(size)
        messages.append(message)
        if not message.get("more_body", False):
            return messages


def replaying(messages: list[dict], receive):
    """A ``receive`` that hands out ``messages`` (the body, already read), then defers to
    ``receive`` (which then waits for the client to disconnect)."""
    body = {"type": "http.request", "body": b"".join(m.get("body", b"") for m in messages), "more_body": False}
    pending = [body]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class TimingAndBodyLimit:
    """ASGI middleware: a ``Server-Timing: app;dur=<ms>, cpu;dur=<ms>`` header on every
    response; a body read in full, counted as it arrives, before the app runs: a 413 past
    ``max_body_bytes`` (declared or counted), a 408 when it is not all there within
    ``body_timeout`` seconds.

    ``app``: wall time in the app (the body read included); ``cpu``: CPU time of the
    event-loop thread meanwhile (the request's own work when it runs inline; unlike ``app``,
    not inflated when the OS deschedules the server)."""

    def __init__(self, app, max_body_bytes: int, body_timeout: float):
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout

    def too_large(self, size: int, declared: bool) -> JSONResponse:
        what = "declared" if declared else "received when it was refused"
        return error_response(413, "batch_too_large", f"a request body of {size} bytes ({what}) exceeds the limit "
                              f"of {self.max_body_bytes}; split it", CLOSE)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, cpu0 = time.perf_counter(), time.thread_time()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.thread_time() - cpu0) * 1e3
                timing = f"app;dur={ms:.3f}, cpu;dur={cpu_ms:.3f}".encode()
                message = {**message, "headers": list(message.get("headers", [])) + [(b"server-timing", timing)]}
            await send(message)

        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self.too_large(int(length), declared=True)(scope, receive, timed_send)
        if length is not None or b"transfer-encoding" in headers:  # a body follows the headers
            try:
                async with asyncio.timeout(self.body_timeout):
                    messages = await read_body(receive, self.max_body_bytes)
            except BodyTooLarge as exc:
                LOG.info("%s %s: body over %d bytes, refused", scope["method"], scope["path"], self.max_body_bytes)
                return await self.too_large(exc.size, declared=False)(scope, receive, timed_send)
            except TimeoutError:
                LOG.info("%s %s: body not complete after %g s, refused", scope["method"], scope["path"], self.body_timeout)
                response = error_response(408, "request_timeout", f"the request body did not arrive within "
                                          f"{self.body_timeout:g} s; send it whole, promptly", CLOSE)
                return await response(scope, receive, timed_send)
            if messages is None:
                return  # the client left; nobody to answer
            receive = replaying(messages, receive)
        await self.app(scope, receive, timed_send)
