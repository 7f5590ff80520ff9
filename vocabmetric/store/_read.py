"""Reading a store: :class:`MetricStore`, its queries, and the checks made on open."""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .._util import vectors as _vectors
from .._version import __version__
from ..vocab.provenance import NONE, PROVENANCE, provenance_codes
from ..errors import StoreError, TokenizerError, TokenNotFound, VocabMetricError
from .integrity import REBUILD, Manifest, open_group, read_array
from ..cost import CostOperator, TreeEnsemble, TreeMetric
from ._schema import EXACT_METRICS, PROVENANCE_KEY, SCHEMA_VERSION, TREE, Neighbor, Token, provenance_counts

LOG = logging.getLogger(__name__)

#: How far above the k-th float32 squared l2 distance (2 − 2·cos) a candidate still gets its
#: exact (float64) cost: twice the float32 error of a d-term dot product (≤ 2·d·2⁻²⁴ ≈ 1e-3
#: at d = 4096) and more, so the k nearest are the exact ones.
L2_SHORTLIST_SLACK = 4e-3


def token_id_of(text: str) -> int | None:
    """The id an all-digit text names (``"12"``, ``" 7 "`` → 12, 7), or None for any other text.

    Only ASCII digits make an id: ``str.isdigit`` is also true for ``"①"``, ``"٣"``, ``"１２"``,
    which are texts. Raises :class:`TokenizerError` for more digits than any id has.
    """
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0") or "0"
    if len(significant) > 19:  # beyond int64 (and, past 4,300 digits, beyond int())
        raise TokenizerError(f"token id {digits[:24]}... ({len(digits)} digits) is out of range: an id has at most 19 digits")
    return int(significant)


def open_store(path: str | os.PathLike) -> "MetricStore":
    """Open a finished store read-only. Clear errors for a missing or unfinished one."""
    return MetricStore(path)


class MetricStore:
    """Read-only queries on a store: neighbours, costs, operators, embeddings.

    A *token* is an id (int) or a text (``" beautiful"``, leading space included). Arrays
    load lazily and are cached; the store is safe to query from several threads.

    >>> store = open_store("runs/demo/metric.zarr")          # doctest: +SKIP
    >>> store.neighbors(" beautiful", k=3, metric="knn")      # doctest: +SKIP
    [Neighbor(id=24415, text=' gorgeous', cost=0.61), ...]
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            hint = " (a build directory? open its metric.zarr)" if (self.path / "metric.zarr").is_dir() else ""
            raise StoreError(f"{self.path} is not a vocabmetric store{hint}; build one with `vocabmetric build CONFIG`")
        self.manifest = Manifest.load(self.path)
        self._root, self.attrs = open_group(self.path, self.manifest)
        if not self.attrs.get("complete"):
            raise StoreError(f"{self.path} is an unfinished store (its build was interrupted); rerun `vocabmetric build`")
        version = self.attrs.get("schema_version")
        if version != SCHEMA_VERSION or type(version) is not int:
            shown = f"{version!r} (a {type(version).__name__})" if type(version) is not int else str(version)
            raise StoreError(
                f"{self.path} has schema version {shown}; this vocabmetric ({__version__}) reads "
                f"version {SCHEMA_VERSION}. Rebuild the store or use a matching vocabmetric."
            )
        self._check_shapes()
        self._lock = threading.Lock()

    def _check_shapes(self) -> None:
        """The attributes agree with the arrays (metadata only): a store that lies about
        its vocabulary would index past its arrays."""
        try:
            vocab_size = self.attrs["tokenizer"]["vocab_size"]
            shapes = {"tokens/offsets": self._root["tokens/offsets"].shape[0] - 1,
                      "embeddings": self._root["embeddings"].shape[0],
                      "tokens/count": self._root["tokens/count"].shape[0]}
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{self.path} lacks {exc} in its metadata; the store is corrupt: {REBUILD}") from None
        for key, rows in shapes.items():
            if type(vocab_size) is not int or rows != vocab_size:
                raise StoreError(f"{self.path}: its attributes say vocab_size {vocab_size!r} but array {key} "
                                 f"has {rows} rows; the store is corrupt: {REBUILD}")

    # -- what is in it ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.attrs["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["tokenizer"]["fingerprint"]

    @property
    def tokenizer_spec(self) -> str:
        return self.attrs["tokenizer"]["spec"]

    @cached_property
    def metrics(self) -> list[str]:
        """Every metric the store answers: ``l2`` (exact), the stored ones, and ``tree``."""
        stored = sorted(self._root["metrics"].group_keys()) if "metrics" in self._root else []
        return list(EXACT_METRICS) + [m for m in stored if m not in EXACT_METRICS]

    def metric_attrs(self, metric: str) -> dict:
        self._check_metric(metric)
        if metric in EXACT_METRICS and f"metrics/{metric}" not in self._root:
            return {"kind": metric, "exact": True, "cap": self._cap(metric)}
        return dict(self._root[f"metrics/{metric}"].attrs)

    def info(self) -> dict:
        """Tokenizer, corpus, embeddings (with ``provenance``: tokens per provenance), versions,
        and the metrics with their k and cap."""
        out = {k: v for k, v in self.attrs.items() if k != "complete"}
        out["path"] = str(self.path)
        if "provenance" not in out.get("embeddings", {}):  # a store built before tokens/provenance
            counts = provenance_counts(self.provenance)
            out["embeddings"] = {**out.get("embeddings", {}), "n_composed": counts["composed"], "provenance": counts}
        out["metrics"] = {m: {k: v for k, v in self.metric_attrs(m).items() if k != "params"} for m in self.metrics}
        return out

    def __repr__(self) -> str:
        return f"MetricStore({str(self.path)!r}, vocab_size={self.vocab_size}, metrics={self.metrics})"

    # -- arrays (lazy, cached) ----------------------------------------------------------
    def _array(self, key: str) -> np.ndarray:
        with self._lock:
            cache = self.__dict__.setdefault("_arrays", {})
            if key not in cache:
                cache[key] = read_array(self._root, key, self.manifest)
            return cache[key]

    @property
    def counts(self) -> np.ndarray:
        return self._array("tokens/count")

    @property
    def trained(self) -> np.ndarray:
        return self._array("tokens/trained")

    @property
    def borrowed_from(self) -> np.ndarray:
        return self._array("tokens/borrowed_from")

    @property
    def provenance(self) -> np.ndarray:
        """(V,) uint8, read-only: how each token got its vector, a code into
        :data:`~vocabmetric.vocab.provenance.PROVENANCE` (:meth:`provenance_of` names it).

        A store built before ``tokens/provenance`` derives it from ``tokens/trained`` and
        ``tokens/borrowed_from`` (trained wins over borrowed; it has no composed tokens).
        Read or derived once, O(V).
        """
        codes = self.__dict__.get("_provenance")
        if codes is None:
            if PROVENANCE_KEY in self._root:
                codes = self._array(PROVENANCE_KEY)
                self._check_provenance(codes)
            else:
                codes = provenance_codes(self.trained, self.borrowed_from)
            codes.setflags(write=False)
            self.__dict__["_provenance"] = codes
        return codes

    def _check_provenance(self, codes: np.ndarray) -> None:
        if codes.dtype != np.uint8 or codes.shape != (self.vocab_size,):
            raise StoreError(f"{self.path}: array {PROVENANCE_KEY} is {codes.dtype} {codes.shape}, expected uint8 "
                             f"({self.vocab_size},); the store is corrupt: {REBUILD}")
        if codes.size and codes.max() >= len(PROVENANCE):
            bad = int(np.argmax(codes >= len(PROVENANCE)))
            raise StoreError(f"{self.path}: array {PROVENANCE_KEY} gives token {bad} the code {int(codes[bad])}, "
                             f"beyond the {len(PROVENANCE)} provenances {PROVENANCE}; the store is corrupt: {REBUILD}")

    def provenance_of(self, token: Token) -> str:
        """How ``token`` (an id or a text) got its vector: ``"trained"``, ``"borrowed"``,
        ``"composed"`` or ``"none"`` (no vector: every cost to it is the cap)."""
        return PROVENANCE[self.provenance[self.resolve(token)]]

    @property
    def usable(self) -> np.ndarray:
        """(V,) bool, read-only: tokens with a vector a metric may use, i.e. any provenance but
        ``none`` (trained, borrowed or composed). Computed once."""
        usable = self.__dict__.get("_usable")
        if usable is None:
            usable = self.provenance != NONE
            usable.setflags(write=False)
            self.__dict__["_usable"] = usable
        return usable

    def embeddings(self, normalized: bool = False) -> np.ndarray:
        """The (V, d) float32 matrix; rows of unusable tokens are placeholders."""
        vectors = self._array("embeddings")
        if not normalized:
            return vectors
        with self._lock:
            if "_normalized" not in self.__dict__:
                self.__dict__["_normalized"] = _vectors.normalized(vectors)
            return self.__dict__["_normalized"]

    def projection2d(self) -> np.ndarray:
        """The (V, 2) float32 2-D map of the usable tokens (UMAP on the kNN graph); NaN rows
        for the others. For pictures (explorer, plots), not for costs."""
        if "projection2d" not in self._root:
            raise StoreError(f"{self.path} has no 2-D map (projection2d); rebuild it with `vocabmetric build` "
                             f"(the [projection] table is on by default)")
        return self._array("projection2d")

    def embedding(self, token: Token) -> np.ndarray:
        return self.embeddings()[self.resolve(token)]

    @cached_property
    def token_bytes_list(self) -> list[bytes]:
        flat = self._array("tokens/bytes").tobytes()
        offsets = self._array("tokens/offsets")
        return [flat[offsets[i] : offsets[i + 1]] for i in range(self.vocab_size)]

    def token_text(self, i: int) -> str:
        return self.token_bytes_list[int(i)].decode("utf-8", errors="backslashreplace")

    @cached_property
    def _by_text(self) -> dict[str, list[int]]:
        table: dict[str, list[int]] = {}
        for i, b in enumerate(self.token_bytes_list):
            if b:
                table.setdefault(b.decode("utf-8", errors="backslashreplace"), []).append(i)
        return table

    # -- tokens ---------------------------------------------------------------------------
    def resolve(self, token: Token) -> int:
        """The id of a token given as an id or a text; clear errors otherwise.

        A text must match exactly one id. An all-digit string (ASCII digits,
        :func:`token_id_of`) that no token has as its text is read as an id.
        """
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            i = int(token)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size}) for {self.tokenizer_spec}")
            return i
        if isinstance(token, str):
            ids = self._by_text.get(token, [])
            if len(ids) == 1:
                return ids[0]
            digits = token_id_of(token) if not ids else None
            if digits is not None:
                return self.resolve(digits)
            if len(ids) > 1:
                raise TokenNotFound(f"token text {token!r} matches several ids: {ids}; pass the id instead")
            raise TokenNotFound(f"no token has the text {token!r} in {self.tokenizer_spec}{self._candidates(token)}")
        raise TokenizerError(f"a token is an id (int) or a text (str), got {type(token).__name__}")

    def resolve_many(self, tokens: Any) -> np.ndarray:
        """Token ids (int64, the input's shape) of an id, a text, an int array, or a sequence
        mixing ids and texts (``[" Paris", 1234]``); each text as in :meth:`resolve`."""
        if isinstance(tokens, (str, int, np.integer)) and not isinstance(tokens, bool):
            return np.asarray(self.resolve(tokens), dtype=np.int64)
        array = np.asarray(tokens, dtype=object if _has_text(tokens) else None)
        if array.dtype != object:
            if array.size and array.dtype.kind not in "iu":
                raise TokenizerError(f"tokens are ids (ints) or texts (str), got an array of {array.dtype}")
            return array.astype(np.int64, copy=False)
        return np.vectorize(self.resolve, otypes=[np.int64])(array) if array.size else array.astype(np.int64)

    def ids_of_text(self, text: str) -> list[int]:
        """Every id whose token text (UTF-8, invalid bytes backslash-escaped) is ``text``."""
        return list(self._by_text.get(text, []))

    def _candidates(self, text: str) -> str:
        key = text.strip().lower()
        near = [t for t in (text.strip(), " " + text.strip(), key, " " + key, key.capitalize(), " " + key.capitalize()) if t in self._by_text]
        near = list(dict.fromkeys(near))[:6]
        return f"; did you mean {', '.join(repr(t) for t in near)}?" if near else ""

    # -- metrics --------------------------------------------------------------------------
    def _check_metric(self, metric: str) -> None:
        if metric not in self.metrics:
            raise StoreError(f"{self.path} has no metric {metric!r}; it has: {', '.join(self.metrics)}")

    def _cap(self, metric: str) -> float:
        caps = self.__dict__.setdefault("_caps", {})
        if metric not in caps:  # cached: a zarr metadata read costs ~0.5 ms, too much per query
            key = f"metrics/{metric}"
            # an exact l2 with no stored table: the largest distance between unit vectors
            caps[metric] = float(self._root[key].attrs["cap"]) if key in self._root else 2.0
        return caps[metric]

    def operator(self, metric: str = "knn") -> CostOperator:
        """The truncated :class:`CostOperator` of a stored metric (fingerprint set)."""
        cached = self.__dict__.get("_operators", {}).get(metric)
        if cached is not None:  # no zarr metadata read per query (~0.5 ms through zarr's sync loop)
            return cached
        self._check_metric(metric)
        if metric == TREE:
            raise StoreError("the tree metric is a TreeMetric, not a CostOperator: use store.tree()")
        if f"metrics/{metric}" not in self._root:
            raise StoreError(
                f"metric {metric!r} is computed exactly on demand and has no stored operator in {self.path}; "
                f"add it to the config's metrics to store its k nearest, or use one of: "
                f"{', '.join(m for m in self.metrics if m not in EXACT_METRICS and m != TREE)}"
            )
        with self._lock:
            cache = self.__dict__.setdefault("_operators", {})
            if metric not in cache:
                g, key = self._root[f"metrics/{metric}"], f"metrics/{metric}"
                indices, costs = (read_array(self._root, f"{key}/{a}", self.manifest) for a in ("indices", "costs"))
                cache[metric] = CostOperator(indices, costs, float(g.attrs["cap"]), self.fingerprint)
            return cache[metric]

    def tree(self) -> TreeMetric | TreeEnsemble:
        """The tree metric (fingerprint set): a :class:`TreeMetric`, or with ``n_trees`` > 1
        a :class:`TreeEnsemble` whose distance is the mean over the trees."""
        if TREE not in self.metrics:
            raise StoreError(f"{self.path} has no tree metric; add [metrics.tree] to the config and rebuild")
        with self._lock:
            if "_tree" not in self.__dict__:
                key = f"metrics/{TREE}"
                parts = [read_array(self._root, f"{key}/{a}", self.manifest) for a in ("parent", "weight", "leaf_of_token")]
                if f"{key}/offsets" in self._root:  # T > 1 trees, stacked
                    offsets = read_array(self._root, f"{key}/offsets", self.manifest)
                    self.__dict__["_tree"] = TreeEnsemble.from_arrays(*parts, offsets, self.fingerprint)
                else:  # one tree (every store before n_trees)
                    self.__dict__["_tree"] = TreeMetric(*parts, self.fingerprint)
            return self.__dict__["_tree"]

    def trees(self) -> tuple[TreeMetric, ...]:
        """Every stored tree, a :class:`TreeMetric` each (one for a single-tree store)."""
        return self.tree().trees

    @property
    def n_trees(self) -> int:
        """How many trees the tree metric averages (0: the store has none)."""
        return int(self._root[f"metrics/{TREE}"].attrs.get("n_trees", 1)) if TREE in self.metrics else 0

    def cost(self, a: Token, b: Token, metric: str = "l2") -> float:
        """The cost between two tokens under ``metric``."""
        i, j = self.resolve(a), self.resolve(b)
        return float(self.costs_from(i, np.array([j]), metric)[0])

    def costs_from(self, token: Token, tokens: Any, metric: str) -> np.ndarray:
        """Costs from ``token`` to each of ``tokens`` (ids or texts, as in :meth:`resolve_many`),
        float32: ``store.costs_from(" London", [" Paris", " Rome"], "tree")``."""
        js = self.resolve_many(tokens).reshape(-1)
        return self.pair_costs(np.full(len(js), self.resolve(token)), js, metric)

    def is_stored(self, a: Token, b: Token, metric: str) -> bool:
        """Whether the cost of ``(a, b)`` under ``metric`` is more than the cap by default:
        for a stored metric, ``b`` is among ``a``'s stored neighbours (or ``a == b``); for
        ``l2``, both tokens have a vector; ``tree`` gives every pair a path. A pair that is
        not stored costs the metric's cap."""
        i, j = self.resolve(a), self.resolve(b)
        self._check_metric(metric)
        if i == j or metric == TREE:
            return True
        if metric in EXACT_METRICS and f"metrics/{metric}" not in self._root:
            return bool(self.usable[i] and self.usable[j])
        return bool(np.any(self.operator(metric).indices[i] == j))

    def pair_costs(self, i: Any, j: Any, metric: str) -> np.ndarray:
        """Costs of the pairs ``(i[t], j[t])`` (broadcast id arrays; texts are resolved as in
        :meth:`resolve_many`), float32.

        O(d) per pair for ``l2`` (exact, :func:`~vocabmetric._util.vectors.l2_distance`; an unusable
        token costs the cap 2), O(k) for a stored metric, O(depth) for ``tree``.
        """
        self._check_metric(metric)
        if _has_text(i) or _has_text(j):
            i, j = self.resolve_many(i), self.resolve_many(j)
        i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
        for t in (i, j):
            if t.size and (t.min() < 0 or t.max() >= self.vocab_size):
                bad = int(t.min() if t.min() < 0 else t.max())
                raise TokenizerError(f"token id {bad} is out of range [0, {self.vocab_size}) for {self.tokenizer_spec}")
        if metric == TREE:
            return np.asarray(self.tree().distance(i, j), dtype=np.float32)
        if metric in EXACT_METRICS:
            d = _vectors.l2_distance(self.embeddings(), i, j)
            usable = self.usable
            d = np.where(usable[i] & usable[j], d, self._cap(metric))
            return np.where(i == j, 0.0, d).astype(np.float32)
        return np.asarray(self.operator(metric).cost(i, j), dtype=np.float32)

    def neighbors(self, token: Token, k: int = 10, metric: str = "knn") -> list[Neighbor]:
        """The ``k`` cheapest tokens from ``token`` under ``metric`` (the token itself excluded).

        Stored metrics return their stored neighbours (at most the stored k); ``l2`` and
        ``tree`` are computed exactly over every usable token (O(V·d) / O(V·depth)).
        An untrained token under the ``isolate`` policy has no neighbours.
        """
        i = self.resolve(token)
        self._check_metric(metric)
        if k < 1:
            raise VocabMetricError(f"k must be >= 1, got {k}")
        if metric in EXACT_METRICS or metric == TREE:
            if not self.usable[i]:
                return []
            candidates = np.flatnonzero(self.usable)
            candidates = candidates[candidates != i]
            if metric == TREE:  # one pass over the tree's nodes, no LCA per pair
                costs = self.tree().distances_from(i)[candidates].astype(np.float32)
            else:  # a float32 pass over the unit vectors picks who can be among the k; exact costs for those
                candidates = self._l2_shortlist(i, candidates, k)
                costs = self.pair_costs(i, candidates, metric)
            top = np.argsort(costs, kind="stable")[:k]
            ids, cs = candidates[top], costs[top]
        else:
            ids, cs = self.operator(metric).neighbors(i)
            ids, cs = ids[:k], cs[:k]
        return [Neighbor(int(j), self.token_text(j), float(c)) for j, c in zip(ids, cs)]

    def _l2_shortlist(self, i: int, candidates: np.ndarray, k: int) -> np.ndarray:
        """The ``candidates`` (ascending ids) whose l2 to ``i`` can be among the ``k``
        smallest: a float32 squared distance over the unit vectors (normalized once, cached),
        every candidate within :data:`L2_SHORTLIST_SLACK` of the k-th kept. O(V·d) float32."""
        if len(candidates) <= k:
            return candidates
        unit = self.embeddings(normalized=True)
        # ‖u_i − u_j‖² = 2 − 2·u_i·u_j for unit rows: one matrix-vector product, no (V, d) copy
        squared = 2 - 2 * (unit @ unit[i])[candidates]
        kth = np.partition(squared, k - 1)[k - 1]
        return candidates[squared <= kth + L2_SHORTLIST_SLACK]

    def faiss_index(self):
        """The faiss inner-product index over the normalized usable embeddings (ids = token ids)."""
        import faiss

        if self.manifest is not None:
            self.manifest.verify_file("index.faiss")
        try:
            return faiss.read_index(str(self.path / "index.faiss"))
        except RuntimeError as exc:
            raise StoreError(f"{self.path}: file index.faiss is unreadable ({exc}); the store is corrupt: {REBUILD}") from None


def _has_text(tokens: Any) -> bool:
    """Whether ``tokens`` (a token, an array or a nested sequence) holds a text."""
    if isinstance(tokens, str):
        return True
    if isinstance(tokens, np.ndarray):
        return tokens.dtype.kind in "OUS" and any(isinstance(t, (str, bytes, np.str_)) for t in tokens.ravel())
    if isinstance(tokens, (list, tuple)):
        return any(_has_text(t) for t in tokens)
    return False
