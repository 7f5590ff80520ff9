"""Debiased Sinkhorn divergence between next-token distributions, on a truncated cost.

The entropic optimal-transport cost between two distributions ``p`` and ``q`` over the
vocabulary is

.. math::

    OT_ε(p, q) = \\min_{P 1 = p,\\ P^T 1 = q} ⟨P, C⟩ + ε·KL(P ‖ p⊗q)
               = ⟨p, f⟩ + ⟨q, g⟩          (f, g: the optimal dual potentials)

and the debiased Sinkhorn divergence (Feydy et al. 2019) is

.. math::

    S_ε(p, q) = OT_ε(p, q) − ½·OT_ε(p, p) − ½·OT_ε(q, q),

which is 0, with gradient 0, at ``p = q``: a regularizer must not push a policy that
already equals its reference.

Two ways to lay the problem out:

* **Full vocabulary** (``support=None``). The cost is the truncated
  :class:`~vocabmetric.cost.CostOperator` (k neighbours, ``cap`` elsewhere, 0 on the
  diagonal), so the Gibbs kernel is a rank-one part plus a sparse part,
  ``K = exp(−cap/ε)·11ᵀ + S`` with ``S_ij = exp(−c_ij/ε) − exp(−cap/ε) ≥ 0`` on the stored
  entries and the diagonal. In the log domain one kernel application is::

      log(K w)_i = logaddexp(−cap/ε + LSE_j h_j,
                             LSE_{j∈N(i)} [h_j − c_ij/ε + log1mexp((cap − c_ij)/ε)])

  with ``h_j = log w_j`` (``= log q_j + g_j/ε`` in a Sinkhorn update) and N(i) the stored
  neighbours of i plus i itself (c_ii = 0): O(V·k) per position, never O(V²). On CPU a
  numba kernel does one multiply-add per stored entry (linear domain, log-domain fallback);
  on CUDA a Triton kernel (:mod:`.triton_kernels`) sums exactly in the log domain; elsewhere a torch
  path gathers rows grouped by degree (:mod:`._kernel`). The solver keeps this
  mode's potentials token-major, (V, n), over the tokens renumbered for locality
  (:func:`~._kernel.locality_order`), so each stored entry reads one contiguous
  row of n values, mostly from cache.
* **Support** (``support=m``). Per position the support is top-m(p) ∪ top-m(q) plus one
  "rest" bin holding the remaining mass at cost ``cap`` from every other point; the
  (2m+1)² cost sub-matrix is gathered from the operator (or computed from embeddings), and
  a kernel application is one batched matrix-vector product with ``K = exp(−C/ε)`` (the
  linear domain, shifted per row; positions whose sums leave the dtype's range are redone
  in the log domain). O(m²) per position and iteration: the practical mode for training.
  The pair OT(p, q) is solved by Newton's method (:mod:`._newton`, O(m³) per step) for
  m ≤ 128: at ε = cap/15 between peaked distributions it converges in tens of steps where
  alternating updates take hundreds to thousands.

Positions are solved in chunks (:func:`~._chunks.solve_by_chunks`): ``p``, ``q`` and the
potential live in reused (chunk, V) buffers, and ``∂S/∂z`` is written per chunk, so no
temporary spans all N positions.

Solver. The potentials solve, in the log domain (stable in float32 down to ε = 0.01·cap),
``f_i = −ε·log Σ_j q_j exp((g_j − C_ij)/ε)`` and ``g_j = −ε·log Σ_i p_i exp((f_i − C_ij)/ε)``.
ε is annealed geometrically from ``cap`` down to its target with one averaged update per
step (ε-scaling, Feydy 2019 Alg. 3.5) of the self-transport potentials; at the target ε
the two symmetric problems OT(p, p), OT(q, q) (update ``f ← ½(f + T_p(f))``, stacked in one
kernel call) run to a marginal error ``tol``, then the pair OT(p, q) (alternating
updates; Newton steps in support mode) starts from OT(q, q)'s potential — the exact
solution when p = q; where p = q bit for bit the pair takes it as is, so S_ε and its
gradient are exactly 0 there. Values are clamped at 0 (S_ε ≥ 0), gradient 0 where clamped.
A position leaves the active set as soon as it has converged. Without debiasing the
pair is annealed.

On the full vocabulary the pair is accelerated (``acceleration``, :mod:`._acceleration`): by
default the heavy-token block Newton (:mod:`._heavy`), which took the benchmark's kNN
operator at ε = cap/15 from a plateau at 1e-2 after 100 iterations to tol 1e-4 in 33
(cold) or 19 (warm start) iterations at N = 64 (``benchmarks/results/regularizers.md``).

Gradient (envelope theorem, never backpropagation through the iterations):
``∂S/∂p = f_pq − f_pp`` (defined up to a constant) and, through the softmax,
``∂S/∂z = p ⊙ (h − ⟨p, h⟩)`` with ``h = f_pq − f_pp``.

Where the parts live: this module holds the ``nn.Module`` and its settings; each mode is a
routine in one table (:mod:`._routines`: "full", "support", and the slot for a fused
support-mode routine on CUDA). A routine builds a geometry (:mod:`._geometry`: the
operations a solver may call; :mod:`._kernel` for the full vocabulary, :mod:`._support` for
a support) and a solver (:mod:`._solver`, log domain; :mod:`._scaling_solver`, scaling
domain), the domain fixed when it is built; the solver loops over an immutable state
(:mod:`._state`) and iterates the pair by an acceleration strategy it is given
(:mod:`._acceleration`). :mod:`._logspace` has the log-space helpers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ...cost import CostOperator
from .._chunks import solve_by_chunks
from .._inputs import Reference
from .._penalty import Penalty
from ._acceleration import ACCELERATIONS
from ._kernel import SparseLogKernel
from ._fused_support import fused_unavailable
from ._routines import ROUTINES, routine_for
from ._solver import eps_schedule

LOG = logging.getLogger(__name__)


class SinkhornDivergence(Penalty):
    """Debiased Sinkhorn divergence ``S_ε(p, q)`` per position, on a truncated ground cost.

    .. math::

        S_ε(p, q) = OT_ε(p, q) − ½OT_ε(p, p) − ½OT_ε(q, q),\\qquad
        OT_ε(p, q) = \\min_{P ∈ Π(p, q)} ⟨P, C⟩ + ε·KL(P ‖ p⊗q) = ⟨p, f⟩ + ⟨q, g⟩.

    Parameters
    ----------
    op : CostOperator
        The truncated cost (k neighbours per token, ``cap`` elsewhere, 0 on the diagonal).
        Debiasing needs a symmetric cost: an asymmetric (kNN) operator is symmetrized
        (``op.symmetrized()``: the union of both directions, the smaller cost where both
        are stored) and a log line says so; an already symmetric operator is used as is.
        ``symmetrize="mutual"`` keeps only the pairs stored in both directions
        (``op.mutual()``: never wider than k a row, where a hub widens every row of the
        union — use it on a model's own embeddings); ``symmetrize=False`` raises on an
        asymmetric operator instead.
    eps : float
        Entropic regularization ε, in the units of the cost (stable down to 0.01·cap in
        float32).
    max_iter : int
        Most Sinkhorn iterations per problem and chunk at the target ε (the ε-scaling
        steps, about log2(cap/ε), come on top); in support mode it also bounds the pair's
        Newton steps.
    tol : float
        Stop a position when the L1 marginal error ``‖P 1 − p‖₁`` of its plan is below
        this. float32 floors near 1e-6; ``max_iter`` then ends the loop.
    debias : bool
        Return S_ε (default) or the biased OT_ε(p, q).
    support : int, optional
        None: full vocabulary, O(V·k) per position and iteration. ``m``: the support
        top-m(p) ∪ top-m(q) plus a rest bin at cost ``cap``, O(m²) per position and
        iteration. Exact when p and q put all their mass on their top m tokens.
    embeddings : array-like, shape (V, d), optional
        Support mode only (a ConfigError with ``support=None``, which never reads them):
        the cost between support tokens is ``min(‖e_i − e_j‖₂, cap)``, exact instead of
        truncated (the ``l2`` metric).
    eps_scaling : float
        Ratio of the geometric ε annealing from ``cap`` down to ``eps`` (0 disables it).
    chunk_size : int, optional
        Positions solved together; default: as many as fit ``CHUNK_BYTES`` (128 MiB) of
        scratch (``GPU_CHUNK_BYTES``, 4 GiB, on a GPU), so extra memory is O(chunk·V·k),
        never O(N·V·k).
    acceleration : {"auto", "none", "newton", "overrelax"}
        How the pair OT(p, q) is iterated: each setting names a strategy object the solver
        is given (:mod:`._acceleration`). Support mode: ``"auto"``/``"newton"`` solve it
        by Newton's method (supports of at most 257 points), ``"none"`` by alternating
        updates; ``"overrelax"`` is full mode only. Full mode: ``"newton"``
        (``"auto"``): each row update solves the ~32 heaviest tokens' potentials exactly
        (:mod:`._heavy`, block Newton); ``"overrelax"``: over-relaxed updates with ω =
        ``relaxation``; ``"none"``: plain alternating updates. Every setting stops at the
        same rule (marginal error ≤ tol) and has the same fixed point, value and gradient.
        One that diverges or stalls is abandoned, with a warning naming it (said once), for
        plain updates from its best iterate.
    relaxation : float, optional
        ω in (0, 2) for ``acceleration="overrelax"`` (default 1.5); full mode only (a
        ConfigError in support mode, which has no over-relaxation).
    warm_start : bool
        Full mode only (a ConfigError in support mode, which would ignore it): keep the
        last call's potentials (per chunk, keyed by the number of positions, chunk rows,
        vocabulary, dtype, device, ε and debiasing; another shape drops them) and start
        the next call of that shape from them instead of the ε schedule: a training step's
        policy and reference change little, so the start is near. It changes the
        iterations only, never the stopping rule: the result is the converged one to
        within tol. Memory: 3 (V, N) potentials held between calls.
        :meth:`clear_warm_start` forgets them.

    backend : {"auto", "torch", "triton"}
        Support mode's solver. ``"triton"``: the fused kernel (:mod:`._fused_support`), one
        launch per chunk solving all its positions' three problems, every iteration in the
        kernel; it needs a CUDA device with Triton, ``debias=True`` and 2·min(m, V) ≤ 128
        (m ≤ 64), and raises (naming which is missing) otherwise. ``"auto"`` takes it
        wherever it can run and falls back to the torch path (Newton steps) elsewhere:
        CPU tensors, no Triton, m > 64, ``debias=False``. Positions the fused loop leaves
        unconverged are solved again on the torch path, so the two agree to within ``tol``.

    Shapes
    ------
    ``forward(logits [..., V], ref)`` → ``[...]``, where ``ref`` is reference logits
    ``[..., V]`` or a top-k pair ``(ids [..., m], logprobs [..., m])``
    (see :func:`~vocabmetric.regularizers.reference_probs`). Computed in float64
    for float64 logits, else float32; the value has the logits' dtype.

    Cost: full mode O(N·V·k) per iteration (about 3 kernel applications per iteration:
    the pair and the two symmetric problems); support mode O(N·V) to pick the supports and
    write the gradient, O(N·m²) per update of the symmetric problems and O(N·m³) per
    Newton step of the pair (tens of steps; alternating updates for m > 128).

    Gradient: ``∂S/∂z = p ⊙ (h − ⟨p, h⟩)``, ``h = f_pq − f_pp`` (envelope theorem); 0 at p = q.
    After each call, ``last_info`` holds the kernel applications per row (``iterations``,
    ε-scaling included, summed over the problems) and the final marginal errors.

    Examples
    --------
    >>> reg = SinkhornDivergence(store.operator("knn"), eps=0.05, support=64)  # doctest: +SKIP
    >>> loss = aggregate(reg(policy_logits, ref_logits), mask)                 # doctest: +SKIP
    """

    name = "sinkhorn"
    takes_metric = True
    backends = ("auto", "torch", "triton")

    def __init__(
        self,
        op: CostOperator,
        *,
        eps: float = 0.1,
        max_iter: int = 100,
        tol: float = 1e-6,
        debias: bool = True,
        support: int | None = None,
        embeddings: Any = None,
        symmetrize: bool | str = True,
        eps_scaling: float = 0.5,
        chunk_size: int | None = None,
        acceleration: str = "auto",
        relaxation: float | None = None,
        warm_start: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        where = "SinkhornDivergence"
        if not isinstance(op, CostOperator):
            raise self.config_error(f"op must be a CostOperator, got {type(op).__name__}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise self.config_error(f"eps must be finite and > 0, got {eps!r}")
        if eps < 0.01 * op.cap * (1 - 1e-9):
            LOG.warning("%s: eps=%g is below 0.01·cap=%g; float32 may lose accuracy", where, eps, 0.01 * op.cap)
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise self.config_error(f"max_iter must be an int >= 1, got {max_iter!r}")
        if not tol > 0:
            raise self.config_error(f"tol must be > 0, got {tol!r}")
        if acceleration not in ACCELERATIONS:
            raise self.config_error(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
        if support is not None and not (isinstance(support, int) and support >= 1):
            raise self.config_error(f"support must be None or an int >= 1, got {support!r}")
        self.op, self.support, self.acceleration = op, support, acceleration
        #: "full" or "support": the routine that runs (:data:`~._routines.ROUTINES`)
        self.mode = "full" if support is None else "support"
        self.embeddings = None if embeddings is None else torch.as_tensor(np.asarray(embeddings, np.float32))
        # each mode's routine checks its own arguments, and rejects those only another reads
        ROUTINES[self.mode].check(self, embeddings=self.embeddings, relaxation=relaxation, warm_start=warm_start)
        self._configure(backend=backend, chunk_size=chunk_size)
        if backend == "triton" and support is None:
            raise self.config_error("backend='triton' is the fused support-mode solver; pass support=m")
        if symmetrize not in (True, False, "union", "mutual"):
            raise self.config_error(f"symmetrize must be True ('union'), 'mutual' or False, got {symmetrize!r}")
        if not op.is_symmetric:
            if not symmetrize:
                raise self.config_error(
                    f"the cost operator {op} is not symmetric, and debiasing needs a "
                    "symmetric cost; pass symmetrize=True (or 'mutual') or op.symmetrized()"
                )
            mutual = symmetrize == "mutual"
            LOG.info("%s: symmetrizing %s (%s; cost(i,j) = cost(j,i) = the smaller stored cost)", where, op,
                     "the mutual pairs" if mutual else "the union of both directions")
            op = op.mutual() if mutual else op.symmetrized()
        self.op = op
        self.eps, self.max_iter, self.tol, self.debias = float(eps), int(max_iter), float(tol), bool(debias)
        self.eps_scaling = float(eps_scaling)
        self.relaxation = 1.5 if relaxation is None else float(relaxation)
        self.warm_start = bool(warm_start)
        self.last_info: dict = {}
        self._warm: dict = {}  # full mode with warm_start: {key: {chunk index: potentials}}
        self._kernels: dict = {}
        self._warned = self._warned_fallback = False

    @classmethod
    def from_store(cls, store: Any, metric: str = "knn", **kw) -> "SinkhornDivergence":
        """Build from a :class:`~vocabmetric.store.MetricStore`'s ``metric`` operator
        (symmetrized if it is not symmetric, as in the constructor).

        For ``metric="l2"`` in support mode the support costs are computed exactly from the
        store's embeddings, normalized to unit length (the l2 metric's normalized Euclidean
        distance).
        """
        op = store.operator(metric)
        if metric == "l2" and kw.get("support") is not None and "embeddings" not in kw:
            kw["embeddings"] = np.asarray(store.embeddings(normalized=True), np.float32)
        return cls(op, **kw)

    @property
    def vocab_size(self) -> int:
        return self.op.vocab_size

    @property
    def fingerprint(self) -> str | None:
        """The tokenizer fingerprint of the cost operator (None if unknown)."""
        return self.op.fingerprint

    def extra_repr(self) -> str:
        return f"{self.op!r}, eps={self.eps}, support={self.support}, debias={self.debias}"

    def sparse_kernel(self, device, dtype) -> SparseLogKernel:
        """The full-vocabulary log-kernel on ``device`` in ``dtype``, made once per pair."""
        key = (str(device), dtype)
        if key not in self._kernels:
            self._kernels[key] = SparseLogKernel(self.op, device, dtype)
        return self._kernels[key]

    def _torch_table(self, device):
        key = (str(device), "table")
        if key not in self._kernels:
            self._kernels[key] = (
                torch.as_tensor(self.op.indices, dtype=torch.int64, device=device),
                torch.as_tensor(self.op.costs, device=device),
            )
        return self._kernels[key]

    def forward(self, logits: torch.Tensor, ref: Reference, *, fingerprint: str | None = None) -> torch.Tensor:
        """Per-position divergence ``[...]`` between ``softmax(logits)`` and the reference."""
        where = "SinkhornDivergence"
        self.check_logits(logits, fingerprint)
        # NaN or +inf inputs make the value NaN, and solve_by_chunks names them then: valid
        # inputs pay no extra pass (a NaN position leaves the solver at its first check)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        eps_list = eps_schedule(self.eps, self.op.cap, self.eps_scaling)
        solve = dict(eps_list=eps_list, max_iter=self.max_iter, tol=self.tol, debias=self.debias)
        run = routine_for(self, logits.device)(self, logits, dtype)
        infos: list[dict] = []

        def chunk(p, q, value_out, dz_out) -> None:
            # p and q must carry the same mass exactly; normalizing both alike keeps p = q
            # bit for bit where the logits are equal (the solver then reuses one solve)
            p, q = p.div_(p.sum(-1, keepdim=True)), q.div_(q.sum(-1, keepdim=True))
            value, info = run.solve(p, q, dz_out, **solve)
            infos.append(info)
            value_out.copy_(value)

        try:
            out = solve_by_chunks(logits, ref, chunk, chunk_size=run.rows, dtype=dtype, where=where)
        finally:
            run.close()
        fell_back = sorted({i.pop("fell_back", None) for i in infos} - {None})
        self.last_info = {key: max(i[key] for i in infos) for key in infos[0]} if infos else {}
        self.last_info.update(run.summary(fell_back))
        self.last_info.update(chunks=len(infos), eps=self.eps, mode=self.mode)
        self._warn_unconverged()
        if self.last_info.get("fell_back") and not self._warned_fallback:
            self._warned_fallback = True
            LOG.warning("SinkhornDivergence: %s; fell back to plain Sinkhorn iterations from the best iterate "
                        "(the result still meets tol). Use another acceleration= or relaxation= (this is said once)",
                        self.last_info["fell_back"])
        return out.to(logits.dtype)

    def _fused_for(self, device: torch.device) -> bool:
        """Whether support mode runs the fused Triton solver (:mod:`._fused_support`) for
        tensors on ``device``: ``backend="auto"`` takes it on CUDA when it can run (Triton,
        debias, 2m within its tile) and the torch path otherwise; ``"triton"`` raises why
        it cannot; ``"torch"`` never takes it."""
        if self.backend == "torch" or self.mode != "support":
            return False
        why = fused_unavailable(device, self.support, self.vocab_size, self.debias)
        if self.backend == "triton" and why is not None:
            raise self.config_error(f"backend='triton' cannot run: {why}; use backend='auto' or 'torch'")
        return why is None and (self.backend == "triton" or device.type == "cuda")

    def _warm_starts(self, logits: torch.Tensor, dtype: torch.dtype, rows: int) -> dict | None:
        """The per-chunk potentials of the last call of this shape (``warm_start=True``),
        ``{chunk index: {"sym", "pair"}}``, filled by this call; None without warm starts.

        The key is everything the potentials' meaning depends on: positions, chunk rows,
        vocabulary, dtype, device, ε and debiasing. A call of another shape drops the
        cache (it holds one shape: 3 (V, N) potentials). A start changes the iterations
        only: every problem still runs until its marginal error is ≤ tol."""
        if not self.warm_start:
            return None
        key = (logits.numel() // self.vocab_size, rows, self.vocab_size, dtype, str(logits.device),
               self.eps, self.debias)
        if key not in self._warm:
            self._warm = {key: {}}
        return self._warm[key]

    def clear_warm_start(self) -> None:
        """Forget the cached potentials (the next call starts cold)."""
        self._warm = {}

    def _warn_unconverged(self) -> None:
        """Say once per instance when ``max_iter`` ended the loop far from ``tol``: the value
        is then off by up to about (marginal error × cap), and the gradient with it."""
        err = max(self.last_info.get("marginal_error", 0.0), self.last_info.get("marginal_error_sym", 0.0))
        if err > max(100 * self.tol, 1e-3) and not self._warned:
            self._warned = True
            LOG.warning("SinkhornDivergence: max_iter=%d stopped positions at an L1 marginal error of %.2g "
                        "(tol %g); the value may be off by up to ≈ %.2g × cap. Raise max_iter or eps "
                        "(last_info has the errors; this is said once)", self.max_iter, err, self.tol, err)
