"""The fused support-mode Sinkhorn solver (one Triton launch per chunk) gives the torch
path's value and gradient; its dispatch and bad inputs.

The solver's tests run on a GPU, or on CPU through Triton's interpreter in a fresh process
(Triton decides at its first import whether it runs interpreted): the wrapper test below
starts that process, so ``make test`` holds the kernel without a GPU.
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

from vocabmetric import CostOperator
from vocabmetric.errors import ConfigError, VocabMetricError
from vocabmetric.regularizers import SinkhornDivergence
from vocabmetric.regularizers.sinkhorn import _fused_support

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(not (CUDA or INTERPRETED) or not HAS_TRITON,
                                 reason="runs on a GPU, or interpreted (test_fused_solver_through_the_interpreter)")


def random_operator(vocab_size: int, k: int, seed: int = 0) -> CostOperator:
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(np.delete(np.arange(vocab_size), i), k, replace=False) for i in range(vocab_size)])
    idx[:, -1] = -1
    return CostOperator(idx, rng.uniform(0.1, 1.0, (vocab_size, k)), cap=1.0).symmetrized()


def peaked_inputs(vocab_size, n, dtype, seed=1):
    """Policy and reference logits, peaked (scale 3) and near each other; row 1 has p = q."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab_size, generator=gen, dtype=dtype) * 3
    r = z + torch.randn(n, vocab_size, generator=gen, dtype=dtype)
    r[1] = z[1]
    return z, r


def value_and_grad(reg, z, r):
    z = z.clone().to(DEVICE).requires_grad_()
    value = reg(z, r.to(DEVICE))
    value.float().sum().backward()
    return value.detach().cpu(), z.grad.cpu()


@pytest.mark.skipif(CUDA or INTERPRETED or not HAS_TRITON, reason="needs Triton and no CUDA device")
def test_fused_solver_through_the_interpreter():
    """No GPU: this file's kernel tests, in a fresh process where Triton runs interpreted."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", Path(__file__).name,
                          "-k", "fused_kernel"], cwd=Path(__file__).parent,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@kernel_runs
@pytest.mark.parametrize("dtype, tol, close", [(torch.float64, 1e-10, (1e-8, 1e-9)),
                                               (torch.float32, 1e-6, (1e-4, 1e-5))])
def test_fused_kernel_equals_the_torch_path(dtype, tol, close):
    """Same value and gradient as the torch path (Newton steps) at m = 8, N = 4; exactly 0
    with gradient 0 where p = q; one launch per chunk (last_info says which solver ran)."""
    op = random_operator(200, k=8)
    z, r = peaked_inputs(200, 4, dtype)
    out = {}
    for backend in ("torch", "triton"):
        reg = SinkhornDivergence(op, eps=0.25, support=8, tol=tol, max_iter=200, backend=backend)
        out[backend] = value_and_grad(reg, z, r)
        assert reg.last_info["backend"] == backend and reg.last_info["marginal_error"] <= max(tol, 1e-5)
    (v_t, g_t), (v_f, g_f) = out["torch"], out["triton"]
    assert v_f[1] == 0 and torch.all(g_f[1] == 0)
    assert (v_f[[0, 2, 3]] > 1e-3).all()  # the comparison is not between zeros
    torch.testing.assert_close(v_f, v_t, rtol=close[0], atol=close[1])
    torch.testing.assert_close(g_f, g_t, rtol=close[0], atol=close[1])


@kernel_runs
def test_fused_kernel_upcasts_half_logits():
    """bf16/fp16 logits are solved in float32: the float32 result on the same rounded
    logits, returned in the logits' dtype."""
    op = random_operator(120, k=6)
    z, r = peaked_inputs(120, 3, torch.float32, seed=2)
    halves = ((torch.bfloat16, slice(0, 2)), (torch.float16, slice(2, 3)))
    for half, rows in halves:  # the float32 run sees the rounded logits
        z[rows], r[rows] = z[rows].to(half).float(), r[rows].to(half).float()
    reg = SinkhornDivergence(op, eps=0.25, support=8, tol=1e-6, backend="triton")
    v32, g32 = value_and_grad(reg, z, r)
    for half, rows in halves:
        v16, g16 = value_and_grad(reg, z[rows].to(half), r[rows].to(half))
        assert v16.dtype == g16.dtype == half
        torch.testing.assert_close(v16, v32[rows].to(half), rtol=0, atol=0)
        torch.testing.assert_close(g16, g32[rows].to(half), rtol=0, atol=0)


@kernel_runs
def test_fused_kernel_edge_shapes():
    """N = 0 gives an empty result (and gradient); m > V takes the whole vocabulary (m = V),
    as the torch path does; positions the fused loop leaves unconverged (max_iter = 1: 20
    iterations) are solved again by the torch path, so the number is the converged one."""
    op = random_operator(6, k=3)
    empty = torch.zeros(0, 6, requires_grad=True, device=DEVICE)
    reg = SinkhornDivergence(op, support=4, backend="triton")
    value = reg(empty, empty.detach())
    value.sum().backward()
    assert value.shape == (0,) and empty.grad.shape == (0, 6)

    z, r = peaked_inputs(6, 3, torch.float64, seed=3)
    big = value_and_grad(SinkhornDivergence(op, support=50, tol=1e-10, backend="triton"), z, r)
    whole = value_and_grad(SinkhornDivergence(op, support=6, tol=1e-10, backend="torch"), z, r)
    for x, y in zip(big, whole):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9)

    op = random_operator(200, k=8)
    z, r = peaked_inputs(200, 4, torch.float64, seed=4)
    short = SinkhornDivergence(op, eps=0.02, support=8, tol=1e-10, max_iter=1, backend="triton")
    v_short = value_and_grad(short, z, r)[0]
    assert short.last_info["fused_redone"] > 0
    v_torch = value_and_grad(SinkhornDivergence(op, eps=0.02, support=8, tol=1e-10, max_iter=1), z, r)[0]
    torch.testing.assert_close(v_short, v_torch, rtol=0, atol=0)


def test_the_fused_backend_says_why_it_cannot_run():
    op = random_operator(50, k=4)
    with pytest.raises(ConfigError, match="support=m"):
        SinkhornDivergence(op, backend="triton")
    z = torch.randn(2, 50)
    if not INTERPRETED:  # a CPU tensor without the interpreter
        with pytest.raises(ConfigError, match="CUDA"):
            SinkhornDivergence(op, support=4, backend="triton")(z, z)
    with pytest.raises(ConfigError, match="debias"):
        SinkhornDivergence(op, support=4, backend="triton", debias=False)(z.to(DEVICE), z.to(DEVICE))
    reason = _fused_support.fused_unavailable(torch.device("cuda"), 65, 1000, True)
    assert reason is not None and "130 support tokens" in reason  # above the 128-token tile
    fits = _fused_support.fused_unavailable(torch.device("cuda"), 64, 1000, True)
    assert fits in (None, "Triton is not installed (pip install triton)")  # m = 64: the 128-token tile


def test_auto_takes_the_torch_path_off_cuda():
    """``backend="auto"`` on CPU tensors: the torch path (the documented fall-back)."""
    if INTERPRETED or CUDA:
        pytest.skip("auto on CPU is checked without the interpreter and without a GPU")
    op = random_operator(50, k=4)
    z, r = peaked_inputs(50, 2, torch.float32)
    reg = SinkhornDivergence(op, support=4)
    reg(z, r)
    assert reg.last_info["backend"] == "torch"


def test_a_reference_on_another_device_is_named():
    op = random_operator(50, k=4)
    z = torch.randn(2, 50)
    with pytest.raises(VocabMetricError, match="reference logits are on meta"):
        SinkhornDivergence(op, support=4)(z, torch.randn(2, 50, device="meta"))


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs Triton, not interpreted")
def test_kernel_compiles_for_sm90():
    """The kernel compiles for an H100/H200 (sm_90) without a GPU: the interpreter is more
    lenient than the compiler (loop-carried types, scalar control flow), so a kernel that
    passes interpreted could still fail to compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from vocabmetric.regularizers.sinkhorn._fused_support_kernel import solve_positions

    dt = "fp32"
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "cost_ptr": f"*{dt}", "eps_ptr": "*fp64", "value_ptr": f"*{dt}",
           "h_ptr": f"*{dt}", "err_ptr": f"*{dt}", "iter_ptr": "*i32", "n_eps": "i32", "tokens": "i32",
           "cap": "fp32", "tol": "fp32", "max_iter": "i32", "TOKENS": "constexpr"}
    compiled = triton_compile(ASTSource(fn=solve_positions, signature=sig, constexprs={(13,): 16}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert ".entry solve_positions" in compiled.asm["ptx"]
