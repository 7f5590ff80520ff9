"""The routines behind :class:`~._divergence.SinkhornDivergence`: one per mode, in one table.

As geomloss's ``SamplesLoss`` holds plain configuration and looks up
``routines[loss][backend]``, ``SinkhornDivergence`` keeps its settings and runs the routine
that :func:`routine_for` finds in :data:`ROUTINES`:

``"full"``
    :class:`FullRoutine`: the truncated cost on the whole vocabulary
    (:class:`~._kernel.SparseLogKernel`); O(N·V·k) per iteration. Its own arguments:
    ``acceleration`` (all four), ``relaxation``, ``warm_start``.
``"support"``
    :class:`SupportRoutine`: top-m(p) ∪ top-m(q) + a rest bin, a dense (s, s) cost per
    position (s = 2m + 1), the pair by Newton's method; O(N·m²) per update, O(N·m³) per
    Newton step, O(N·V) to pick the supports. Its own arguments: ``support``,
    ``embeddings``, ``acceleration`` ("auto", "newton", "none").
``"support-fused"``
    :class:`FusedSupportRoutine`: support mode with each chunk solved in one Triton launch
    (:mod:`._fused_support`); :func:`routine_for` sends a support-mode call to it wherever
    its ``applies(module, device)`` says so (``backend="auto"`` on CUDA when Triton, the
    tile and ``debias`` allow; ``backend="triton"`` anywhere, else a ConfigError naming
    why), and to :class:`SupportRoutine` otherwise. The support mode's arguments, checked
    by :meth:`SupportRoutine.check`.

A routine is a class with the interface below; the module calls nothing else::

    Routine.check(module, embeddings=, relaxation=, warm_start=)   at construction: its own
        arguments, and ConfigError for an argument another mode reads (it would be ignored)
    run = Routine(module, logits, dtype)        one forward: kernels, chunk size, warm starts
    run.rows                                     positions per chunk
    run.solve(p, q, dz_out, **solve) -> (value (rows,), info)   one chunk; ∂S/∂z into dz_out
    run.summary(fell_back) -> dict               the mode's entries of last_info
    run.close()                                  frees per-forward scratch (always called)
"""

from __future__ import annotations

import torch

from ._full import solve_full_chunk
from ._fused_support import solve_support_fused
from ._solver import solver_chunk_rows
from ._support import solve_support_chunk


class SupportRoutine:
    """Support mode (``support=m``): :func:`~._support.solve_support_chunk` per chunk."""

    mode = "support"

    @staticmethod
    def check(module, *, embeddings, relaxation, warm_start) -> None:
        if module.acceleration == "overrelax":
            raise module.config_error("acceleration='overrelax' is for the full vocabulary (support=None); "
                                      "in support mode choose 'auto' (Newton) or 'none'")
        if relaxation is not None:
            raise module.config_error(f"relaxation={relaxation!r} is read by acceleration='overrelax' on the "
                                      "full vocabulary (support=None) only; drop it in support mode")
        if warm_start:
            raise module.config_error("warm_start=True keeps full-vocabulary potentials between calls "
                                      "(support=None); support mode solves each call afresh: drop warm_start "
                                      "or pass support=None")
        if embeddings is not None and embeddings.shape[0] != module.op.vocab_size:
            raise module.config_error(
                f"embeddings have {embeddings.shape[0]} rows, the operator {module.op.vocab_size}")

    def __init__(self, module, logits: torch.Tensor, dtype: torch.dtype):
        self.module = module
        device = logits.device
        self.rows = module.chunk_size or solver_chunk_rows(module.vocab_size, dtype, device, support=module.support,
                                                           slot_map=module.embeddings is None)
        self.embeddings = None if module.embeddings is None else module.embeddings.to(device)
        self.scratch: dict = {}  # the slot map, kept for the forward

    def solve(self, p, q, dz_out, **solve):
        m = self.module
        return solve_support_chunk(p, q, support=m.support, table=m._torch_table(p.device), cap=m.op.cap,
                                   embeddings=self.embeddings, scratch=self.scratch, dz_out=dz_out,
                                   newton=m.acceleration != "none", **solve)

    def summary(self, fell_back: list[str]) -> dict:
        return {"backend": "torch"}

    def close(self) -> None:
        self.scratch.clear()


class FusedSupportRoutine(SupportRoutine):
    """Support mode in one Triton launch per chunk (:func:`~._fused_support.solve_support_fused`):
    the same support, values and gradient as :class:`SupportRoutine` to within ``tol``."""

    @staticmethod
    def applies(module, device: torch.device) -> bool:
        return module._fused_for(device)

    def solve(self, p, q, dz_out, **solve):
        m = self.module
        return solve_support_fused(p, q, support=m.support, table=m._torch_table(p.device), cap=m.op.cap,
                                   embeddings=self.embeddings, scratch=self.scratch, dz_out=dz_out, **solve)

    def summary(self, fell_back: list[str]) -> dict:
        return {"backend": "triton"}


class FullRoutine:
    """The full vocabulary (``support=None``): :func:`~._full.solve_full_chunk` per chunk on
    the module's :class:`~._kernel.SparseLogKernel`, with its warm starts."""

    mode = "full"

    @staticmethod
    def check(module, *, embeddings, relaxation, warm_start) -> None:
        if embeddings is not None:
            raise module.config_error("embeddings= give support mode its exact l2 costs (support=m); the full "
                                      "vocabulary reads the operator only: drop embeddings or pass support=")
        if relaxation is not None and not (isinstance(relaxation, (int, float)) and 0 < relaxation < 2):
            raise module.config_error(f"relaxation must be in (0, 2), got {relaxation!r}")

    def __init__(self, module, logits: torch.Tensor, dtype: torch.dtype):
        self.module = module
        self.kernel = module.sparse_kernel(logits.device, dtype)
        self.rows = module.chunk_size or solver_chunk_rows(module.vocab_size, dtype, logits.device,
                                                           kernel=self.kernel)
        self.starts = module._warm_starts(logits, dtype, self.rows)
        self.chunks = 0

    def solve(self, p, q, dz_out, **solve):
        m = self.module
        warm = None if self.starts is None else self.starts.setdefault(self.chunks, {})
        self.chunks += 1
        info = {"warm": bool(warm)}
        value, more = solve_full_chunk(self.kernel, p, q, dz_out=dz_out, acceleration=m.acceleration,
                                       relaxation=m.relaxation, warm=warm, **solve)
        info.update(more)
        return value, info

    def summary(self, fell_back: list[str]) -> dict:
        return dict(acceleration=self.module.acceleration, fell_back=", ".join(fell_back) or None)

    def close(self) -> None:
        self.kernel.release()


#: The routine per mode; "support-fused" runs support mode where its ``applies`` says so.
ROUTINES: dict = {"full": FullRoutine, "support": SupportRoutine, "support-fused": FusedSupportRoutine}


def routine_for(module, device: torch.device):
    """The routine class that runs ``module``'s mode on ``device``."""
    fused = ROUTINES.get("support-fused")
    if module.mode == "support" and fused is not None and fused.applies(module, device):
        return fused
    return ROUTINES[module.mode]
