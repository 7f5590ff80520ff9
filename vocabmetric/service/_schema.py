"""The service's wire format: its limits, the request and response models, its errors.

Every model here is what FastAPI validates a request against and renders in
``/openapi.json``; an error is ``RequestError(status, type, message)``, sent as
``{"error": {"type": ..., "message": ...}}`` (the table in :mod:`vocabmetric.service`).
"""

from __future__ import annotations

import logging
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from ..errors import TokenizerError, TokenNotFound, VocabMetricError

LOG = logging.getLogger(__name__)

MAX_K = 1024
MAX_BATCH = 1024
MAX_PAIRS = 100_000
MAX_BODY_BYTES = 8 << 20


# -- the service's own errors: what went wrong, as an HTTP status and a type ---------------
class RequestError(Exception):
    """An error the client caused: ``status`` (4xx), ``type`` (e.g. ``"bad_token"``), ``message``."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def error_of(exc: VocabMetricError) -> RequestError:
    """The HTTP error of a store error the client caused."""
    if isinstance(exc, TokenNotFound):
        return RequestError(404, "token_not_found", str(exc))
    if isinstance(exc, TokenizerError):
        return RequestError(400, "bad_token", str(exc))
    return RequestError(400, "bad_request", str(exc))


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
