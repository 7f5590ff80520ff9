"""A small Python client of the service: each endpoint as a method, each error as its class."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError, StoreError, TokenizerError, TokenNotFound, VocabMetricError
from ...store import Neighbor
from .projection import decode_projection

LOG = logging.getLogger(__name__)

#: The :mod:`vocabmetric.errors` class a 4xx of each error type raises.
ERROR_CLASSES: dict[str, type[VocabMetricError]] = {
    "token_not_found": TokenNotFound,
    "bad_token": TokenizerError,
    "unknown_metric": StoreError,
    "limit_exceeded": ConfigError,
    "batch_too_large": ConfigError,
    "invalid_request": ConfigError,
    "malformed_json": ConfigError,
    "no_projection": StoreError,
    "request_timeout": ConfigError,
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
        exc = ERROR_CLASSES.get(type_, VocabMetricError)(message)
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
