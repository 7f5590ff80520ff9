"""Sliced Wasserstein distance between next-token distributions over token embeddings.

Each token i has a vector ``x_i`` (unit length for a store's embeddings). For ``L`` random
unit directions ``θ_l`` the tokens' projections ``x_i·θ_l`` lie on a line, where W1 has a
closed form; the sliced distance is their mean:

.. math::

    SW_1(p, q) = \\frac1L \\sum_l \\sum_j \\mathrm{gap}_{l,j}\\,
                 \\Big| \\sum_{k ≤ j} (p − q)_{σ_l(k)} \\Big|,

``σ_l`` the tokens sorted by projection and ``gap_{l,j}`` the distance between the j-th and
(j+1)-th of them. The sort happens once, at construction; a call is one pass per direction
over the vocabulary in that order — O(N·V·L), exact for every direction, no V×V object.

Gradient (subgradient, ``sign(0) = 0``, so exactly 0 at ``p = q``): token ``σ_l(k)`` enters
every prefix from k on, so

.. math::

    ∂SW/∂p_{σ_l(k)} = \\frac1L \\sum_l \\sum_{j ≥ k} \\mathrm{gap}_{l,j}\\, \\mathrm{sign}(C_{l,j})
    ,\\qquad ∂SW/∂z = p ⊙ (g − ⟨p, g⟩),

a reversed prefix sum along the same order; it is accumulated in the same pass as the
value (a constant shift of g does not change ``∂/∂z``, so the pass needs only the running
sum so far). The forward pass saves ``∂SW/∂z``; backward scales it.

**Untrained tokens** (``usable`` False: no learned vector) are not given a made-up
direction. All of them sit at one point ``far`` beyond the largest trained projection on
every direction (default: the spread of the trained projections on that direction, so an
untrained token is at least as far from every trained token as the two farthest trained
tokens are from each other). Moving mass between two untrained tokens is free — the
embeddings cannot tell them apart; a KL term still can. They cost nothing in the pass:
the sorted order lists only the ``T`` usable tokens, and the last gap is ``far``.

**Near and far.** For a point move of mass m from token a to b the value is
``m·mean_l |θ_l·(x_a − x_b)|``, proportional to ``‖x_a − x_b‖`` in expectation over random
directions: on the demo store (200 trained t*, near = t*'s nearest knn neighbour, far = a
token at the median l2 distance) far/near is 2.83 with 64 random directions against l2's
2.80, 2.29 with the 64 principal directions (``directions="pca"``), 3.34 with 16 of them.
Yet in the one-step RL experiment (``experiments/penalty_experiment.py``) Sliced does not
tell near from far at the β that shapes the other penalties (π(far)/π(near) 1.00 at β = 4,
random or PCA directions); only at β ≈ 100–135 does it reach 0.80–0.85, where it lets
0.6–1.0 nats of KL into the tail. Train with support-mode Sinkhorn (or
:class:`~vocabmetric.regularizers.TreeWasserstein`).

Backends: ``"numba"`` (CPU; one fused pass per direction and position, compiled on first
use and cached) and ``"torch"`` (any device; gather, cumsum, scatter per direction).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._chunks import solve_by_chunks
from ._inputs import Reference, chunk_rows
from ._numba import compile_once, prefetch, run_rows
from ._penalty import NUMBA_BACKENDS as BACKENDS, Penalty

#: Positions swept together by the CPU kernel: their values at one token are contiguous, so
#: each step of the sorted order is one short vector load and SIMD work across positions,
#: and the R running sums are independent chains instead of one serial chain. The sweep is
#: bound by random reads of the (V, R) scratch, so R also sets how much of it stays in
#: cache: at V = 100k, 8 (6.4 MB of scratch a thread) runs 10–15 % faster than 16 (12.8 MB)
#: on the benchmark's machine, and 4 is slower again (per-step overhead).
ROWS_AT_ONCE = 8


@compile_once
def _numba_kernel(numba):
    """The CPU kernel (cached on disk; serial and GIL-free: :func:`~._numba.run_rows` gives
    each thread a range of positions).

    For blocks of ``ROWS_AT_ONCE`` positions: ``d = (p − q)ᵀ`` and the gradient ``g`` are
    (V, R) scratch; along each direction's sorted order σ, with ``C_j = Σ_{k ≤ j} d_σ(k)``,
    the value gains ``gap_j·|C_j|`` and ``g_σ(j) −= Σ_{k < j} gap_k·sign(C_k)``; the rows of
    the next tokens in the order are prefetched 8 steps ahead. Finally
    ``∂SW/∂z = p ⊙ (g − ⟨p, g⟩) / L``. O(V·L) per position.
    """
    fetch = prefetch()
    ahead = 8

    @numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"contract"})
    def sliced_rows(p, q, value, dz, order, gaps, untrained, want_grad, rows_at_once):
        n, vocab_size = p.shape
        n_dir, n_sorted = order.shape
        d = np.empty((vocab_size, rows_at_once), dtype=p.dtype)
        g = np.empty((vocab_size, rows_at_once), dtype=p.dtype)
        cdf = np.empty(rows_at_once, dtype=np.float64)
        acc = np.empty(rows_at_once, dtype=np.float64)
        total = np.empty(rows_at_once, dtype=np.float64)
        shift = np.empty(rows_at_once, dtype=np.float64)
        R = rows_at_once
        for lo in range(0, n, R):
            m = min(R, n - lo)
            for i in range(vocab_size):
                for r in range(m):
                    d[i, r] = p[lo + r, i] - q[lo + r, i]
                for r in range(m, R):  # padding lanes: no mass, results ignored
                    d[i, r] = 0.0
                for r in range(R):
                    g[i, r] = 0.0
            total[:] = 0.0
            shift[:] = 0.0  # g of the untrained point: it lies after every gap
            for ell in range(n_dir):
                cdf[:] = 0.0  # Σ_{k ≤ j} (p − q)_σ(k)
                acc[:] = 0.0  # Σ_{k < j} gap_k·sign(C_k): g(σ(j)) up to a constant
                for j in range(n_sorted):
                    if j + ahead < n_sorted:
                        nxt = order[ell, j + ahead]
                        fetch(d, nxt, 0)
                        if want_grad:
                            fetch(g, nxt, 0)
                    k = order[ell, j]
                    gap = gaps[ell, j]
                    if want_grad:
                        for r in range(R):
                            c = cdf[r] + d[k, r]
                            cdf[r] = c
                            total[r] += gap * abs(c)
                            g[k, r] -= acc[r]
                            acc[r] += gap * (np.float64(c > 0) - np.float64(c < 0))
                    else:
                        for r in range(R):
                            c = cdf[r] + d[k, r]
                            cdf[r] = c
                            total[r] += gap * abs(c)
                for r in range(R):
                    shift[r] -= acc[r]
            for r in range(m):
                value[lo + r] = total[r] / n_dir
            if not want_grad:
                continue
            for u in untrained:
                for r in range(R):
                    g[u, r] += shift[r]
            cdf[:] = 0.0  # now ⟨p, g⟩ per position; tokens outer, so g is read in order
            for i in range(vocab_size):
                for r in range(m):
                    cdf[r] += p[lo + r, i] * g[i, r]
            for i in range(vocab_size):
                for r in range(m):
                    dz[lo + r, i] = p[lo + r, i] * (g[i, r] - cdf[r]) / n_dir

    return sliced_rows


class SlicedWasserstein(Penalty):
    """Sliced W1 over token embeddings, per position, with ``n_projections`` fixed directions.

    Parameters
    ----------
    embeddings : array-like, shape (V, d)
        One vector per token id (rows of unusable tokens are ignored).
    n_projections : int
        Number of random directions L (uniform on the sphere, drawn with ``seed``).
    seed : int
        Seed of the directions: the same seed gives the same regularizer.
    usable : array-like of bool, shape (V,), optional
        Tokens with a learned vector (default: all). The others sit at the far point.
    far : float, optional
        Distance of the untrained point beyond the largest trained projection; default the
        spread of the trained projections on each direction.
    directions : {"random", "pca"} or array-like, shape (L, d), optional
        ``"random"`` (default): uniform on the sphere. ``"pca"``: the ``n_projections``
        leading principal directions of the usable embeddings (:func:`principal_directions`;
        deterministic, orthonormal, ``n_projections ≤ d``). An array: explicit directions
        (normalized to unit length); overrides ``n_projections``/``seed``.
    fingerprint : str, optional
        Tokenizer fingerprint, checked against ``forward(..., fingerprint=)``.
    backend : {"auto", "numba", "torch"}
    chunk_size : int, optional
        Positions per chunk; default ≈ 2**22 / V.

    Attributes
    ----------
    directions_ : (L, d) float64, unit rows.
    order_ : (L, T) int32, usable token ids sorted by projection, per direction.
    gaps_ : (L, T) float64, distance to the next sorted token; the last is ``far_``
        (0 when every token is usable).
    far_ : (L,) float64.

    Shapes
    ------
    ``forward(logits [..., V], ref, *, fingerprint=None)`` → ``[...]`` (float32, or float64
    for float64 logits); ``ref`` is reference logits ``[..., V]`` or a top-k pair
    ``(ids [..., m], logprobs [..., m])``.

    Cost: construction O(L·V·(d + log V)); a call O(N·V·L) time for value and gradient
    together; memory O(L·V) for the orders, O(chunk·V) scratch, and the saved ``∂SW/∂z``
    (one tensor the size of the logits) until backward.

    Examples
    --------
    >>> reg = SlicedWasserstein.from_store(store, n_projections=16)         # doctest: +SKIP
    >>> loss = (reg(policy_logits, ref_logits) * mask).sum() / mask.sum()   # doctest: +SKIP
    """

    name = "sliced"
    backends = BACKENDS

    def __init__(
        self,
        embeddings: Any,
        *,
        n_projections: int = 64,
        seed: int = 0,
        usable: Any = None,
        far: float | None = None,
        directions: Any = None,
        fingerprint: str | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__()
        emb = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] < 1:
            raise self.config_error(f"embeddings must be a (V, d) array, got shape {emb.shape}")
        vocab_size, dim = emb.shape
        mask = np.ones(vocab_size, dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
        if mask.shape != (vocab_size,):
            raise self.config_error(f"usable has shape {mask.shape}, expected ({vocab_size},) like the embeddings")
        if not mask.any():
            raise self.config_error(f"no usable token (usable is all False); train embeddings first")
        bad = np.flatnonzero(mask & ~np.isfinite(emb).all(1))
        if bad.size:
            raise self.config_error(f"embedding of usable token {bad[0]} is not finite; mark it unusable or fix it")
        self._configure(backend=backend, chunk_size=chunk_size)
        if far is not None and not (np.isfinite(far) and far > 0):
            raise self.config_error(f"far must be finite and > 0, got {far}")
        if directions is None or isinstance(directions, str):
            if not isinstance(n_projections, (int, np.integer)) or n_projections < 1:
                raise self.config_error(f"n_projections must be a positive int, got {n_projections!r}")
            if directions is None or directions == "random":
                directions = np.random.default_rng(seed).standard_normal((int(n_projections), dim))
            elif directions == "pca":
                if n_projections > min(dim, int(mask.sum())):
                    raise self.config_error(f"directions='pca' gives at most {min(dim, int(mask.sum()))} directions "
                                            f"(d = {dim}, {int(mask.sum())} usable tokens), got n_projections={n_projections}")
                directions = principal_directions(emb[mask], int(n_projections))
            else:
                raise self.config_error(f"directions must be 'random', 'pca' or an (L, {dim}) array, got {directions!r}")
        theta = np.asarray(directions, dtype=np.float64)
        if theta.ndim != 2 or theta.shape[1] != dim or not np.all(np.linalg.norm(theta, axis=1) > 0):
            raise self.config_error(f"directions must be non-zero rows of shape (L, {dim}), got {theta.shape}")
        self.directions_ = theta / np.linalg.norm(theta, axis=1, keepdims=True)
        trained = np.flatnonzero(mask)
        proj = emb[trained] @ self.directions_.T  # (T, L)
        sort = np.argsort(proj, axis=0, kind="stable").T  # (L, T)
        sorted_proj = np.take_along_axis(proj.T, sort, axis=1)
        spread = sorted_proj[:, -1] - sorted_proj[:, 0]
        self.far_ = np.full(len(theta), float(far)) if far is not None else np.where(spread > 0, spread, 1.0)
        self.order_ = trained[sort].astype(np.int32)
        self.gaps_ = np.zeros_like(sorted_proj)
        self.gaps_[:, :-1] = np.diff(sorted_proj, axis=1)
        self.untrained_ = np.flatnonzero(~mask).astype(np.int64)
        if self.untrained_.size:
            self.gaps_[:, -1] = self.far_
        self._proj_max = sorted_proj[:, -1]
        self._emb = emb
        self._fingerprint, self._vocab_size = fingerprint, vocab_size
        self._tables: dict = {}

    @classmethod
    def from_store(cls, store: Any, *, n_projections: int = 64, seed: int = 0, **kw) -> "SlicedWasserstein":
        """Build from a :class:`~vocabmetric.store.MetricStore`: its unit-length embeddings,
        its ``usable`` mask and its fingerprint."""
        return cls(store.embeddings(normalized=True), n_projections=n_projections, seed=seed,
                   usable=store.usable, fingerprint=store.fingerprint, **kw)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def fingerprint(self) -> str | None:
        return self._fingerprint

    @property
    def n_projections(self) -> int:
        return len(self.directions_)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, n_projections={self.n_projections}, "
                f"untrained={len(self.untrained_)}, backend={self.backend!r}")

    def positions(self, direction: int) -> np.ndarray:
        """The coordinate of every token on direction ``direction`` (V,), float64: the
        projection for usable tokens, ``max + far`` for the others."""
        out = self._emb @ self.directions_[direction]
        out[self.untrained_] = self._proj_max[direction] + self.far_[direction]
        return out

    def cpu_kernel(self):
        return _numba_kernel()

    def _torch_tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._tables:
            self._tables[key] = (
                torch.as_tensor(self.order_, dtype=torch.int64, device=device),
                torch.as_tensor(self.gaps_, dtype=dtype, device=device),
                torch.as_tensor(self.untrained_, dtype=torch.int64, device=device),
            )
        return self._tables[key]

    def forward(self, logits: torch.Tensor, ref: Reference, *, fingerprint: str | None = None) -> torch.Tensor:
        """Per-position sliced W1 ``[...]`` between ``softmax(logits)`` and the reference."""
        where = "SlicedWasserstein"
        self.check_logits(logits, fingerprint)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        backend = self.backend_for(logits.device)
        if backend == "numba":
            gaps = self.gaps_.astype(np.float32 if dtype == torch.float32 else np.float64)
        else:
            tables = self._torch_tables(logits.device, dtype)

        def chunk(p, q, value_out, dz_out) -> None:
            q = q.contiguous()
            if backend == "numba":
                want_grad = dz_out is not None
                dz_rows = dz_out.numpy() if want_grad else np.empty((p.shape[0], 0), dtype=p.numpy().dtype)
                run_rows(_numba_kernel(), (p.numpy(), q.numpy(), value_out.numpy(), dz_rows),
                         (self.order_, gaps, self.untrained_, want_grad, ROWS_AT_ONCE))
            else:
                _chunk_torch(tables, p, q, value_out, dz_out)

        chunk_size = self.chunk_size
        if backend == "numba" and chunk_size is None:  # whole blocks of ROWS_AT_ONCE per thread
            lanes = ROWS_AT_ONCE * max(1, torch.get_num_threads())
            chunk_size = max(lanes, chunk_rows(logits.shape[-1], logits.device) // lanes * lanes)
        return solve_by_chunks(logits, ref, chunk, chunk_size=chunk_size, dtype=dtype, where=where)


def principal_directions(vectors: Any, n_directions: int) -> np.ndarray:
    """The ``n_directions`` leading principal directions of ``vectors`` (T, d): rows of the
    centred SVD's ``Vᵀ``, (n, d) float64, orthonormal; each row's sign is fixed so that its
    largest-magnitude component is positive (deterministic). Cost O(T·d²)."""
    x = np.asarray(vectors, dtype=np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    vt = vt[:n_directions]
    sign = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    return vt * np.where(sign == 0, 1.0, sign)[:, None]


def _chunk_torch(tables, p, q, value_out, dz_out) -> None:
    """The same sums with torch ops, one direction at a time (any device)."""
    order, gaps, untrained = tables
    n_dir = order.shape[0]
    diff = p - q
    total = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    grad = torch.zeros_like(p) if dz_out is not None else None
    for ell in range(n_dir):
        index = order[ell].expand(p.shape[0], -1)
        cdf = diff.gather(1, index).cumsum_(1)
        total += cdf.abs() @ gaps[ell]
        if grad is None:
            continue
        acc = torch.sign(cdf).mul_(gaps[ell]).cumsum_(1)  # Σ_{k ≤ j} gap_k·sign(C_k)
        grad.scatter_add_(1, index[:, 1:], -acc[:, :-1])
        if untrained.numel():
            grad[:, untrained] -= acc[:, -1:]
    value_out.copy_(total / n_dir)
    if dz_out is not None:
        mean = (p * grad).sum(-1, keepdim=True)
        torch.mul(grad.sub_(mean), p, out=dz_out).div_(n_dir)
