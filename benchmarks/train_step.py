"""A policy-gradient training step with each penalty: its time over the no-penalty and the
``full_kl`` steps, and its peak memory, in one run.

The step: the policy's forward and backward (a policy-gradient loss on sampled tokens plus
β · the penalty against the reference's logits) and the reference's forward (no grad). The
model is built from a config, never downloaded: on ``--device cuda`` Qwen2.5-1.5B's shape
(28 layers, hidden 1536, V = 151,936) in bf16 with 8 × 1,024 tokens; on CPU a small shape
(2 layers, hidden 64, V = 32,768, 2 × 128 tokens). A random model's logits are nearly
uniform, so the logits are scaled by one factor, found once by bisection, that makes the
mean top-1 probability ``--top1`` (0.47, a trained model's); the reference is the policy
``--lag`` SGD steps behind (their KL per token is recorded). The penalties' ground costs
are the regularizers benchmark's synthetic ones (a balanced tree, clustered unit embeddings,
32 random neighbours per token), since no V = 152k store is at hand.

Rows: ``none`` (the policy-gradient loss only), ``full_kl``, ``tree``, ``sliced`` (L = 16),
``sinkhorn`` (support m = 64, tol 1e-4; ``backend="auto"``: the fused Triton solver on
CUDA) and, on CUDA, ``sinkhorn torch`` (the torch path, for comparison). The time is the
median of ``--repeats`` steps after one warm-up, penalties taken round-robin; the memory
is the step's peak above the level before it (CUDA allocator, or sampled RSS on CPU).

    .venv/bin/python benchmarks/train_step.py                  # CPU: results/train_step.{json,md}
    python benchmarks/train_step.py --device cuda              # results/train_step_cuda.{json,md}
    python benchmarks/train_step.py --tiny --out /tmp/x        # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402
from regularizers import PeakCUDA, PeakRSS, balanced_tree, clustered_embeddings, random_neighbour_operator  # noqa: E402

from vocabmetric.regularizers import SinkhornDivergence, SlicedWasserstein, TreeWasserstein, aggregate, full_kl  # noqa: E402

#: (layers, hidden, heads, kv heads, intermediate, vocab, batch, sequence) per shape.
SHAPES = {
    "qwen2.5-1.5b": (28, 1536, 12, 2, 8960, 151936, 8, 1024),
    "small": (2, 64, 4, 2, 128, 32768, 2, 128),
    "tiny": (1, 32, 2, 1, 64, 2048, 1, 16),
}
BETA = 0.04


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layers, hidden, heads, kv, inter, vocab, _, seq = SHAPES[shape]
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq, 128),
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def penalties(vocab_size: int, device: str) -> dict:
    """The rows' penalties, as makers (only the rows asked for are built; the Sinkhorn rows
    share one symmetrized operator)."""
    operator = functools.cache(lambda: random_neighbour_operator(vocab_size).symmetrized())
    regs = {
        "none": lambda: None,
        "full_kl": lambda: full_kl,
        "tree": lambda: TreeWasserstein(balanced_tree(vocab_size)),
        "sliced": lambda: SlicedWasserstein(clustered_embeddings(vocab_size), n_projections=16),
        "sinkhorn": lambda: SinkhornDivergence(operator(), eps=0.1, support=64, tol=1e-4),
    }
    if device.startswith("cuda"):
        regs["sinkhorn torch"] = lambda: SinkhornDivergence(operator(), eps=0.1, support=64, tol=1e-4, backend="torch")
    return regs


def peak_scale(logits: torch.Tensor, top1: float) -> float:
    """The factor s with mean top-1 probability of ``softmax(s · logits)`` = ``top1`` (bisection
    on log s; the mean top-1 probability grows with s)."""
    z = logits.float()
    lo, hi = 0.0, 12.0  # log s
    for _ in range(30):
        mid = (lo + hi) / 2
        got = torch.softmax(z * torch.exp(torch.tensor(mid)), -1).amax(-1).mean().item()
        lo, hi = (mid, hi) if got < top1 else (lo, mid)
    return float(torch.exp(torch.tensor((lo + hi) / 2)))


def drift(policy, reference, tokens, scale: float, vocab: int) -> dict:
    """The policy's peakedness (mean top-1 probability, top-64 mass) and its KL per token
    from the reference."""
    with torch.no_grad():
        lp = torch.log_softmax(policy(tokens).logits.float() * scale, -1)
        lq = torch.log_softmax(reference(tokens).logits.float() * scale, -1)
        probs = lp.exp()
        return {"top1": probs.amax(-1).mean().item(),
                "top64_mass": probs.topk(min(64, vocab), -1).values.sum(-1).mean().item(),
                "kl_per_token": (probs * (lp - lq)).sum(-1).mean().item(), "logit_scale": scale}


def pg_loss(logits, actions, advantages) -> torch.Tensor:
    """The policy-gradient loss ``−mean(A · log π(action))`` on sampled tokens."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, actions[..., None])[..., 0]
    return -(advantages * logp).mean()


def step(policy, reference, tokens, actions, advantages, scale: float, penalty) -> float:
    """One step's loss (backward done); the reference forward included."""
    with torch.no_grad():
        ref_logits = reference(tokens).logits * scale
    logits = policy(tokens).logits * scale
    loss = pg_loss(logits, actions, advantages)
    if penalty is not None:
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        loss = loss + BETA * aggregate(penalty(logits, ref_logits), mask)
    loss.backward()
    policy.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: qwen2.5-1.5b on cuda, small on cpu)")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, 1 repeat: a check that it runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top1", type=float, default=0.47, help="mean top-1 probability of the logits")
    parser.add_argument("--lag", type=int, default=3, help="SGD steps the reference is behind the policy")
    parser.add_argument("--max-kl", type=float, default=0.02, help="largest KL per token of the reference's lag")
    parser.add_argument("--only", nargs="*", default=None, help="penalty rows to run (default: all)")
    parser.add_argument("--name", default=None, help="results name (default: train_step[_cuda])")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shape = "tiny" if args.tiny else args.shape or ("qwen2.5-1.5b" if cuda else "small")
    repeats = 1 if args.tiny else args.repeats
    dtype = torch.bfloat16 if cuda else torch.float32
    _, _, _, _, _, vocab, batch, seq = SHAPES[shape]

    policy = build_model(shape, args.device, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    with torch.no_grad():
        scale = peak_scale(policy(tokens).logits, args.top1)
    # the reference: the policy before --lag SGD steps on the policy-gradient loss
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    actions = torch.randint(0, vocab, (batch, seq), generator=gen).to(args.device)
    advantages = torch.randn(batch, seq, generator=gen).to(args.device)
    # a learning rate that drifts the policy a training step's worth (KL per token ≤ --max-kl),
    # tried from large to small, each try from the reference
    for lr in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6):
        policy = copy.deepcopy(reference).train().requires_grad_(True)
        opt = torch.optim.SGD(policy.parameters(), lr=lr)
        for _ in range(args.lag):
            logits = policy(tokens).logits * scale
            pg_loss(logits, actions, advantages).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt, logits
        shape_info = drift(policy, reference, tokens, scale, vocab)
        if shape_info["kl_per_token"] <= args.max_kl:
            break
    shape_info["lr"] = lr

    regs = {k: make() for k, make in penalties(vocab, args.device).items()
            if not args.only or k in set(args.only) | {"none", "full_kl"}}
    peak = PeakCUDA if cuda else PeakRSS
    times: dict[str, list[float]] = {k: [] for k in regs}
    memory: dict[str, float] = {k: 0.0 for k in regs}
    info: dict[str, dict] = {}
    for name, reg in regs.items():  # warm-up: compilation, tables
        step(policy, reference, tokens, actions, advantages, scale, reg)
    for _ in range(repeats):
        for name, reg in regs.items():
            with peak() as mem:
                start = time.perf_counter()
                step(policy, reference, tokens, actions, advantages, scale, reg)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            memory[name] = max(memory[name], mem.extra_mb)
            if reg is not None and getattr(reg, "last_info", None):
                info[name] = {k: v for k, v in reg.last_info.items() if isinstance(v, (int, float, str))}
    base, kl = statistics.median(times["none"]), statistics.median(times["full_kl"])
    rows = [{"penalty": name, "step_s": statistics.median(t), "over_none": statistics.median(t) / base,
             "over_full_kl": statistics.median(t) / kl, "peak_extra_mb": memory[name],
             "over_full_kl_memory": memory[name] / memory["full_kl"] if memory["full_kl"] >= 1 else None,
             "info": info.get(name, {})} for name, t in times.items()]
    layers, hidden, heads, kv, inter, _, _, _ = SHAPES[shape]
    payload = {"device": args.device, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
               "model": {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv,
                         "intermediate": inter, "vocab": vocab}, "tokens": [batch, seq], "repeats": repeats,
               "lag": args.lag, "beta": BETA, **shape_info, "torch_threads": torch.get_num_threads(),
               "rows": rows, "machine": machine_info(args.device)}
    name = args.name or ("train_step_cuda" if cuda else "train_step")
    path = write_results(name, payload, table(payload), Path(args.out) if args.out else None)
    print(table(payload))
    print(f"wrote {path}")


def table(payload: dict) -> str:
    m = payload["model"]
    lines = [f"# Training step with each penalty ({payload['device']}, {payload['dtype']})", "",
             f"Qwen2-shaped model from a config ({payload['shape']}: {m['layers']} layers, hidden {m['hidden']}, "
             f"V = {m['vocab']:,}), {payload['tokens'][0]} × {payload['tokens'][1]} tokens; logits scaled ×"
             f"{payload['logit_scale']:.3g} to a mean top-1 probability of {payload['top1']:.2f} "
             f"(top-64 mass {payload['top64_mass']:.2f}); reference {payload['lag']} SGD steps behind "
             f"(lr {payload['lr']:g}; KL {payload['kl_per_token']:.4f} per token). Median of {payload['repeats']} steps; "
             f"{payload['machine'].get('gpu') or payload['machine']['cpu']}, {payload['torch_threads']} threads, "
             f"{payload['machine']['date']}.", "",
             "| penalty | step (s) | × no penalty | × full_kl step | peak extra (MB) | × full_kl memory |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        mem = f"{r['over_full_kl_memory']:.2f}" if r["over_full_kl_memory"] is not None else "–"
        lines.append(f"| {r['penalty']} | {r['step_s']:.3f} | {r['over_none']:.2f} | {r['over_full_kl']:.2f} | "
                     f"{r['peak_extra_mb']:.0f} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
