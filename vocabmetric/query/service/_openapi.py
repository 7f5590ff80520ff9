"""The app's OpenAPI schema, told what FastAPI cannot infer from the handlers' signatures.

The handlers check their limits themselves (so that the error names the limit: ``k=0 is
outside [1, 1024]`` rather than a generic validation error); this module writes those
limits into the schema, per app: ``k`` in [1, max_k], ids in [0, V), at most ``max_batch``
ids and ``max_pairs`` pairs, ``metric`` one of the store's metrics (an enum). Error
responses (400/404/408/413/422, all ``ErrorResponse``) are declared on the routes.
"""

from __future__ import annotations

import logging

from fastapi.openapi.utils import get_openapi

LOG = logging.getLogger(__name__)

#: How tokens in responses say where their vector came from, in the schema's description.
PROVENANCE_NOTE = """Every token in a response (the `query` and each of its `neighbors`, `a` and `b` of GET /cost)
carries `provenance`, how it got its vector: `trained` (learned from the corpus or imported), `borrowed`
(a trained token's vector with the same normalized text), `composed` (built from the token's parts) or
`none` (no vector: it costs the cap to every other token and has no neighbours). GET /info counts them
(`embeddings.provenance`).

"""

#: The error types, in the schema's description (the same table as the package docstring).
ERROR_TABLE = """Every error is `{"error": {"type": "...", "message": "..."}}` (the message names the bad value):

| type | status | cause |
|---|---|---|
| unknown_metric | 400 | a metric the store does not hold (the message lists them) |
| bad_token | 400 | an id out of range, or both/neither of `token` and `id` |
| malformed_json | 400 | a body that is not JSON |
| token_not_found | 404 | a text that matches no id, or several (candidates listed) |
| no_projection | 404 | GET /projection on a store built without the 2-D map |
| not_found | 404 | an unknown path |
| method_not_allowed | 405 | a known path, another method (`Allow` lists the methods) |
| request_timeout | 408 | a request body that did not arrive in time |
| batch_too_large | 413 | more than `max_batch` ids / `max_pairs` pairs, or a body over `max_body_bytes` |
| limit_exceeded | 422 | `k` outside [1, max_k], or a request over the work budget `max_work` |
| invalid_request | 422 | a parameter of the wrong type or shape |
"""


def restrict(node: dict, kind: str, **bounds) -> None:
    """Add ``bounds`` to the schema ``node`` if it is of JSON type ``kind``, or to its
    ``kind`` branches when it is an ``anyOf`` (an optional parameter, a text-or-id)."""
    for branch in node.get("anyOf", [node]):
        if branch.get("type") == kind:
            branch.update(bounds)


def describe_limits(schema: dict, state) -> dict:
    """Write ``state``'s limits and metrics into ``schema`` (an OpenAPI dict), in place."""
    metrics = list(state.store.metrics)
    token_id = {"minimum": 0, "maximum": state.vocab_size - 1}
    k = {"minimum": 1, "maximum": state.max_k}
    for path, method in (("/neighbors", "get"), ("/cost", "get")):
        for param in schema["paths"][path][method].get("parameters", []):
            node = param["schema"]
            if param["name"] == "metric":
                restrict(node, "string", enum=metrics)
            elif param["name"] == "k":
                restrict(node, "integer", **k)
            elif param["name"] == "id":
                restrict(node, "integer", **token_id)
    models = schema.get("components", {}).get("schemas", {})
    for name, model in models.items():
        props = model.get("properties", {})
        if name.startswith("NeighborsBatchRequest"):
            props["ids"].update(maxItems=state.max_batch)
            restrict(props["ids"]["items"], "integer", **token_id)
            restrict(props["k"], "integer", **k)
            restrict(props["metric"], "string", enum=metrics)
        elif name.startswith("CostBatchRequest"):
            props["pairs"].update(maxItems=min(state.max_pairs, state.max_work))
            for item in props["pairs"]["items"].get("prefixItems", []):
                restrict(item, "integer", **token_id)
            restrict(props["metric"], "string", enum=metrics)
    return schema


def openapi_for(app, state):
    """``app.openapi``: FastAPI's schema with ``state``'s limits, made once."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = describe_limits(schema, state)
        return app.openapi_schema

    return openapi
