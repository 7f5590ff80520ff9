"""Time per GRPOTrainer step: TRL's own KL (k3) against each vocabmetric penalty, in one run.

Real ``trl.GRPOTrainer`` steps on CPU — generation, reward, policy and reference forward,
backward, optimizer — with a randomly initialized Llama whose LM head has V = 50,257
outputs (GPT-2's width; 2 layers, hidden 128), 4 prompts × 8 generations × 32 new tokens
= 1,024 completion tokens per step. Prompts come from the Lee corpus through a small BPE
tokenizer; the penalties use ground costs of the benchmark's synthetic but realistic kind
(benchmarks/regularizers.py: a balanced tree, clustered unit embeddings, 32 random
neighbours per token), since no V = 50k HF tokenizer with a built store exists offline.

Rows: ``GRPOTrainer`` without penalty (beta = 0), with TRL's k3 KL (beta = 0.04: the
baseline), and ``VocabMetricGRPOTrainer`` (beta = 0) with ``full_kl``, ``tree``,
``sliced`` (L = 16) and ``sinkhorn`` (support m = 64), penalty_beta = 0.04. The time is
the median of TRL's own ``step_time`` over the steps after the first; the ratio is to the
k3 row. Configurations are run round-robin, ``--rounds`` times, to spread the noise of a
shared machine over all of them.

    .venv/bin/python benchmarks/trl_step.py            # writes results/trl_step.{json,md}
    .venv/bin/python benchmarks/trl_step.py --quick    # 1 round, 3 steps
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402
from conftest import fast_tokenizer, lee_texts, train_bpe  # noqa: E402
from regularizers import balanced_tree, clustered_embeddings, random_neighbour_operator  # noqa: E402

from vocabmetric.regularizers import FullKL, SinkhornDivergence, SlicedWasserstein, TreeWasserstein  # noqa: E402

V = 50257
BETA = 0.04


def penalties():
    return {
        "full_kl": lambda: FullKL(),
        "tree": lambda: TreeWasserstein(balanced_tree(V)),
        "sliced": lambda: SlicedWasserstein(clustered_embeddings(V), n_projections=16),
        "sinkhorn": lambda: SinkhornDivergence(random_neighbour_operator(V), eps=0.1, support=64, tol=1e-4),
    }


def model_for(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def run(name: str, model: str, tokenizer, dataset, steps: int, out: Path) -> list[float]:
    from trl import GRPOConfig, GRPOTrainer

    from vocabmetric.integrations.trl import VocabMetricGRPOConfig, VocabMetricGRPOTrainer

    common = dict(output_dir=str(out / name), per_device_train_batch_size=32, num_generations=8,
                  max_completion_length=32, max_steps=steps, learning_rate=1e-4, report_to=[], logging_steps=1,
                  use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True)
    reward = lambda completions, **kw: [float(len(c)) for c in completions]  # noqa: E731
    if name in ("none", "k3"):
        args = GRPOConfig(beta=0.0 if name == "none" else BETA, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    else:
        args = VocabMetricGRPOConfig(beta=0.0, penalty=name, penalty_beta=BETA, **common)
        trainer = VocabMetricGRPOTrainer(model=model, reward_funcs=reward, args=args,
                                         train_dataset=dataset, processing_class=tokenizer,
                                         regularizer=penalties()[name]())
    trainer.train()
    return [h["step_time"] for h in trainer.state.log_history if "step_time" in h][1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = fast_tokenizer(train_bpe(tmp / "tokenizer.json"))
        model_for(tokenizer).save_pretrained(tmp / "model")  # TRL loads its reference from a path
        dataset = datasets.Dataset.from_dict({"prompt": [t[:80] for t in lee_texts()[:64]]})
        names = ["none", "k3", "full_kl", "tree", "sliced", "sinkhorn"]
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names:
                times[name] += run(name, str(tmp / "model"), tokenizer, dataset, steps, tmp / f"round{r}")
                print(f"round {r} {name:9s} median step {statistics.median(times[name]):.3f} s", flush=True)
    base = statistics.median(times["k3"])
    rows = [{"penalty": n, "step_s": round(statistics.median(times[n]), 4), "ratio_to_k3": round(statistics.median(times[n]) / base, 3),
             "steps_timed": len(times[n])} for n in names]
    payload = {"machine": machine_info(), "vocab_size": V, "completion_tokens_per_step": 32 * 32,
               "beta": BETA, "rows": rows}
    write_results("trl_step", payload, table(payload))
    print(table(payload))


def table(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# GRPOTrainer step time: TRL's k3 KL against vocabmetric penalties",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m.get('torch')}; V = {payload['vocab_size']:,}, "
             f"{payload['completion_tokens_per_step']:,} completion tokens per step. Median of TRL's step_time.", "",
             "| penalty | step (s) | × k3 step | steps timed |", "|---|---:|---:|---:|"]
    labels = {"none": "none (beta = 0)", "k3": "TRL k3 KL (baseline)"}
    for r in payload["rows"]:
        lines.append(f"| {labels.get(r['penalty'], r['penalty'])} | {r['step_s']:.3f} | {r['ratio_to_k3']:.2f} | {r['steps_timed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
