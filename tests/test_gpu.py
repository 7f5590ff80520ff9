"""The regularizers on a GPU give what they give on CPU, and the Triton kernel that the
full-vocabulary Sinkhorn runs there equals the torch path.

Tests marked ``gpu`` need a CUDA device and are left out of ``make test``
(``pytest -m gpu tests/test_gpu.py`` runs them). The Triton kernel's test runs on CPU too,
through Triton's interpreter, wherever Triton is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vocabmetric import CostOperator, TreeMetric
from vocabmetric.regularizers import SinkhornDivergence, SlicedWasserstein, TreeWasserstein, full_kl
from vocabmetric.regularizers.sinkhorn import triton_kernels as _triton
from vocabmetric.regularizers.sinkhorn._kernel import SparseLogKernel

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def random_operator(vocab_size: int, k: int, seed: int = 0) -> CostOperator:
    """k distinct random neighbours per token (one slot empty), symmetrized: uneven degrees."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(np.delete(np.arange(vocab_size), i), k, replace=False) for i in range(vocab_size)])
    idx[:, -1] = -1
    return CostOperator(idx, rng.uniform(0.1, 1.0, (vocab_size, k)), cap=1.0).symmetrized()


#: Triton decides at its first import whether its own helpers (tl.max, tl.sum) run
#: interpreted; in a process that has imported it already the interpreter cannot run them.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(CUDA or INTERPRETED or not HAS_TRITON, reason="needs Triton and no CUDA device")
def test_triton_kernel_through_the_interpreter():
    """No GPU: the kernel's test below, in a fresh process where Triton runs interpreted."""
    test = f"{Path(__file__).name}::test_triton_kernel_equals_the_gathered_torch_path"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         cwd=Path(__file__).parent, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture
def triton_kernel():
    """The Triton kernel on the GPU, or through Triton's interpreter on CPU tensors."""
    if not (CUDA or INTERPRETED):
        pytest.skip("runs on a GPU, or interpreted in a fresh process (test_triton_kernel_through_the_interpreter)")
    pytest.importorskip("triton")
    _triton.sparse_lse_kernel.cache_clear()
    yield "cuda" if CUDA else "cpu"
    _triton.sparse_lse_kernel.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block, tile", [(_triton.BLOCK_ROWS, _triton.TILE), (2, 4)])
def test_triton_kernel_equals_the_gathered_torch_path(triton_kernel, monkeypatch, dtype, block, tile):
    """Same log-kernel, −inf rows and entries included, at an ε where the dense term is
    e^-90 below the sparse one (the log-domain case); with tiles of 4 entries (rows of up
    to 13 take several) and blocks of 2 positions (3 positions take two)."""
    device = triton_kernel
    monkeypatch.setattr(_triton, "BLOCK_ROWS", block)
    monkeypatch.setattr(_triton, "TILE", tile)
    kernel = SparseLogKernel(random_operator(120, k=6), device, dtype)
    h = torch.randn(3, 120, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device) * 4
    h[0, :30] = float("-inf")
    h[1] = float("-inf")
    h = h.t().contiguous()  # token-major, as the solver calls the kernel
    for eps in (0.5, 1 / 90):
        fast, gathered = kernel.triton(h, eps), kernel.gathered(h, eps)
        assert torch.equal(torch.isneginf(fast), torch.isneginf(gathered))
        finite = torch.isfinite(gathered)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(fast[finite], gathered[finite], rtol=tol, atol=tol)


def _value_and_grad(reg, z, r):
    z = z.clone().requires_grad_()
    value = reg(z, r)
    value.sum().backward()
    return value.detach().cpu(), z.grad.cpu()


def _assert_cuda_equals_cpu(reg, z, r, tol):
    """Value and gradient on CUDA equal CPU's: ``tol = (rtol, atol)`` of the value, then of the gradient."""
    v_cpu, g_cpu = _value_and_grad(reg, z, r)
    v_gpu, g_gpu = _value_and_grad(reg, z.cuda(), r.cuda())
    torch.testing.assert_close(v_gpu, v_cpu, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(g_gpu, g_cpu, rtol=tol[2], atol=tol[3])


def _inputs(vocab_size, n=4, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab_size, generator=gen, dtype=dtype) * 3
    return z, z + torch.randn(n, vocab_size, generator=gen, dtype=dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("support", [None, 16])
def test_sinkhorn_on_cuda_equals_cpu(support):
    reg = SinkhornDivergence(random_operator(300, k=8), eps=0.1, tol=1e-10, max_iter=3000, support=support)
    _assert_cuda_equals_cpu(reg, *_inputs(300), tol=(1e-8, 1e-10, 1e-6, 1e-9))


@gpu
@needs_cuda
def test_tree_sliced_and_full_kl_on_cuda_equal_cpu():
    V = 300
    rng = np.random.default_rng(0)
    # tokens 0..V-1 are leaves; node V + g is the parent of tokens 4g..4g+3; its parent the root
    parent = np.concatenate([V + np.arange(V) // 4, np.full(V // 4, V + V // 4), [-1]])
    tree = TreeMetric(parent, np.append(rng.uniform(0.1, 1.0, len(parent) - 1), 0.0), np.arange(V))
    emb = rng.standard_normal((V, 8)).astype(np.float32)
    regs = [TreeWasserstein(tree), SlicedWasserstein(emb, n_projections=8), full_kl]
    z, r = _inputs(V)
    for reg in regs:
        _assert_cuda_equals_cpu(reg, z, r, tol=(1e-9, 1e-12, 1e-7, 1e-12))


@gpu
@needs_cuda
def test_bf16_logits_on_cuda_give_the_float32_result():
    """bf16 logits are computed in float32: the result equals the float32 run on the same
    (bf16-rounded) logits, rounded to bf16."""
    op = random_operator(2000, k=16)
    z, r = (t.float().cuda().bfloat16() for t in _inputs(2000, n=8, dtype=torch.float32))
    for reg in (SinkhornDivergence(op, eps=0.1, tol=1e-6), SinkhornDivergence(op, eps=0.1, support=32, tol=1e-6)):
        v16, g16 = _value_and_grad(reg, z, r)
        v32, g32 = _value_and_grad(reg, z.float(), r.float())
        assert v16.dtype == g16.dtype == torch.bfloat16
        torch.testing.assert_close(v16.float(), v32, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(g16.float(), g32, rtol=2e-2, atol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("support, dtype, tol, close", [
    (16, torch.float64, 1e-10, (1e-7, 1e-9)),
    (64, torch.float32, 1e-6, (1e-3, 1e-5)),  # the 128 × 128 tile, which the interpreter cannot afford
])
def test_fused_support_on_cuda_equals_the_torch_path(support, dtype, tol, close):
    """The fused Triton solver (one launch per chunk; ``backend="auto"`` takes it on CUDA)
    gives the torch path's value and gradient at N = 64 positions, V = 2,000."""
    op = random_operator(2000, k=16)
    z, r = (t.cuda() for t in _inputs(2000, n=64, dtype=dtype))
    r[5] = z[5]  # p = q: exactly 0
    fused = SinkhornDivergence(op, eps=0.1, support=support, tol=tol, max_iter=300)
    reference = SinkhornDivergence(op, eps=0.1, support=support, tol=tol, max_iter=300, backend="torch")
    v_f, g_f = _value_and_grad(fused, z, r)
    v_t, g_t = _value_and_grad(reference, z, r)
    assert fused.last_info["backend"] == "triton" and reference.last_info["backend"] == "torch"
    assert v_f[5] == 0 and torch.all(g_f[5] == 0)
    torch.testing.assert_close(v_f, v_t, rtol=close[0], atol=close[1])
    torch.testing.assert_close(g_f, g_t, rtol=close[0], atol=close[1])
