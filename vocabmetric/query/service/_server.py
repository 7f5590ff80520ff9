"""Running the service: uvicorn with the protocol and limits that keep it responsive.

* ``TCP_NODELAY`` on every accepted socket. asyncio sets it only on sockets whose ``proto``
  is ``IPPROTO_TCP``; uvicorn's multi-worker listening socket is made with proto 0, so
  without this a response's header and body segments meet Nagle's algorithm and the
  client's delayed ACK: +40 ms per request with ``--workers 2``.
* Slow clients: a request's headers must arrive within ``header_timeout`` s of the
  connection being ready for them (uvicorn has no such deadline: a client that sends half
  a request line is held forever), its body within ``body_timeout`` s (the middleware), an
  idle keep-alive connection closes after ``KEEP_ALIVE_TIMEOUT`` s, headers are at most
  ``MAX_HEADER_BYTES``, and a worker takes at most ``limit_concurrency`` connections and
  requests at once (beyond: uvicorn's 503).
"""

from __future__ import annotations

import logging
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ._schema import HEADER_TIMEOUT, KEEP_ALIVE_TIMEOUT, LIMIT_CONCURRENCY, MAX_HEADER_BYTES

LOG = logging.getLogger(__name__)

STORE_ENV = "VOCABMETRIC_STORE"  # the store of the app factory used with several workers
OPTIONS_ENV = "VOCABMETRIC_SERVICE_OPTIONS"  # create_app's keyword arguments (JSON) for that factory
FACTORY = "vocabmetric.query.service._app:app_from_env"  # that factory, as uvicorn imports it


class ServiceProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus ``TCP_NODELAY`` on the accepted socket and a deadline
    for each request's headers (``config.header_timeout`` s, counted from the connection
    being made or the previous response being sent)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - a socket already gone
                pass
        self.header_timer = None
        self.arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.arm_header_deadline()

    def connection_lost(self, exc) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def arm_header_deadline(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        if self.transport.is_closing():
            return
        timeout = getattr(self.config, "header_timeout", HEADER_TIMEOUT)
        self.header_timer = self.loop.call_later(timeout, self.header_deadline_passed, self.cycle, timeout)

    def header_deadline_passed(self, cycle, timeout: float) -> None:
        """Close the connection if no request began since the deadline was set (``cycle``
        is still the latest) and none is in progress."""
        self.header_timer = None
        if self.transport.is_closing() or self.cycle is not cycle or (cycle is not None and not cycle.response_complete):
            return
        LOG.info("%s: no complete request headers within %g s; closing", self.client, timeout)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def uvicorn_config(app, *, host: str, port: int, workers: int = 1, log_level: str = "info",
                   header_timeout: float = HEADER_TIMEOUT, limit_concurrency: int = LIMIT_CONCURRENCY, **kwargs):
    """The ``uvicorn.Config`` the service runs under (``ServiceProtocol``, the timeouts, the caps);
    ``kwargs`` go to uvicorn (``factory=True``, ``access_log=False``, ...)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, workers=workers, log_level=log_level, http=ServiceProtocol,
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, limit_concurrency=limit_concurrency,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
    config.header_timeout = header_timeout  # read by ServiceProtocol; pickled with the config to the workers
    return config
