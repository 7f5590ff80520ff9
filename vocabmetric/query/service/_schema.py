"""The service's wire format: its limits, the request and response models, its errors.

Every model here is what FastAPI validates a request against and renders in
``/openapi.json``; an error is ``RequestError(status, type, message)``, sent as
``{"error": {"type": ..., "message": ...}}`` (the table in :mod:`vocabmetric.query.service`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, WithJsonSchema

from ...vocab.provenance import PROVENANCE
from ...errors import TokenizerError, TokenNotFound, VocabMetricError

LOG = logging.getLogger(__name__)

MAX_K = 1024
MAX_BATCH = 1024
MAX_PAIRS = 100_000
MAX_BODY_BYTES = 8 << 20
#: Cost evaluations one request may ask for: ids × k for a stored metric, ids × V for an
#: exact one (``l2``/``tree`` score every token per id), the number of pairs for POST /cost.
#: 2²¹ is ~20 exact scans at V = 100k (~0.4 s of CPU), or 1,024 ids × k = 1,024 stored.
MAX_WORK = 1 << 21
HEADER_TIMEOUT = 5.0  # s for a request's headers to arrive, from the connection being ready for it
BODY_TIMEOUT = 30.0  # s for a whole request body to arrive, from its headers
KEEP_ALIVE_TIMEOUT = 5.0  # s an idle keep-alive connection stays open
LIMIT_CONCURRENCY = 1024  # connections + requests in flight per worker; beyond: 503
MAX_HEADER_BYTES = 16 << 10  # the request line and headers (h11's incomplete-event limit)


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


class ErrorDetail(BaseModel):
    type: str = Field(description="a short machine-readable name, e.g. bad_token (the table in the description)")
    message: str = Field(description="what was wrong, naming the value, and what to do")


class ErrorResponse(BaseModel):
    """The body of every 4xx (and of a 5xx, which is a bug)."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` for the error ``statuses`` of an endpoint, all the ErrorResponse body."""
    why = {400: "unknown metric, bad token id, malformed JSON", 404: "no token has that text (or several do)",
           405: "a known path, another method (the Allow header lists the methods)",
           408: "the request body did not arrive in time", 413: "a batch or body over the limits",
           422: "a parameter of the wrong type or shape, k outside its bounds, or a request over the work budget"}
    return {status: {"model": ErrorResponse, "description": why[status]} for status in statuses}


# -- response and request models -----------------------------------------------------------
def integral(value: int | float) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return value


#: A JSON integer: 7, and 7.0 too (JSON Schema's ``integer`` is any number without a
#: fractional part); never a string or a bool.
JsonInt = Annotated[Union[StrictInt, StrictFloat], AfterValidator(integral), WithJsonSchema({"type": "integer"})]
TokenRef = Union[JsonInt, StrictStr]  # a JSON integer is an id, a string is resolved
#: How a token got its vector, by name (an enum in the schema): one of ``PROVENANCE``.
Provenance = Literal[PROVENANCE]  # type: ignore[valid-type]  # Literal[("a", "b")] is Literal["a", "b"]
PROVENANCE_DESCRIPTION = ("how the token got its vector: trained (learned from the corpus or imported), borrowed "
                          "(a trained token's vector with the same normalized text), composed (built from the "
                          "token's parts), none (no vector: it costs the cap to every other token)")


class TokenModel(BaseModel):
    id: int = Field(description="token id")
    text: str = Field(description="token text (undecodable bytes as \\xNN)")
    provenance: Provenance = Field(description=PROVENANCE_DESCRIPTION)


class NeighborModel(BaseModel):
    id: int
    text: str
    cost: float
    provenance: Provenance = Field(description=PROVENANCE_DESCRIPTION)


class NeighborsResponse(BaseModel):
    query: TokenModel
    metric: str
    k: int = Field(description="the k asked for; fewer neighbours when the metric stores fewer")
    neighbors: list[NeighborModel] = Field(description="cheapest first, the query itself excluded")


class NeighborsBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[JsonInt] = Field(description=f"token ids, at most {MAX_BATCH} by default")
    k: JsonInt = 10
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
    example: Union[dict[str, Any], None] = Field(None, description="{id, text}: the token the explorer opens on (None: none fits)")
    vocab_size: int
    fingerprint: str
    schema_version: int
    vocabmetric_version: str
    created: str
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    embeddings: dict[str, Any] = Field(description="method, dim, params, n_trained, n_borrowed, n_composed, and "
                                       "provenance: {trained, borrowed, composed, none: number of tokens}")
    metrics: dict[str, dict[str, Any]] = Field(description="metric name -> kind, k, cap, cap_statistic")
    limits: dict[str, int]
