"""The results of experiments/real_lm_grpo.py: table, frontier picture and plain sentences.

Per cell (arm × strength) the held-out measures at the last evaluation, mean over seeds
(and each seed's). The comparison: for each Wasserstein cell at semantic drift ``d_W``, the
reward a KL arm reaches at the same drift, linear between that arm's own cells (its
strengths, plus the reference at step 0 and the unpenalized run); ``Δ = r_W − r_KL(d_W)``.
A Δ is called a difference only when it exceeds the noise ``σ`` (:func:`noise`); otherwise
"no difference within the noise".
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PLOT = ROOT / "docs" / "real_lm_grpo.png"
NAME = "real_lm_grpo"
MEASURES = ("reward", "drift", "kl_per_token", "ref_perplexity", "vivid_hits")
KL_ARMS = ("exact KL", "k3")
W_ARMS = ("sinkhorn import", "tree import", "sinkhorn word2vec")
COMMAND = ("PYTHONPATH=. .venv/bin/python experiments/real_lm_grpo.py --model SMOLLM2_HF_DIR "
           "--import-store runs/smollm2/metric.zarr --w2v-store runs/smollm2-word2vec/metric.zarr --threads 1")


def cells(state) -> list[dict]:
    """One row per (arm, β): final-evaluation means over seeds, and the seeds' values."""
    groups: dict = {}
    for run in state["runs"].values():
        groups.setdefault((run["arm"], run["beta_kl_units"]), []).append(run)
    out = []
    for (arm, beta), runs in groups.items():
        row = {"arm": arm, "beta": beta, "strength": runs[0]["beta"], "seeds": [r["seed"] for r in runs],
               "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in runs)}
        for m in MEASURES:
            values = [r["evals"][-1][m] for r in runs]
            row[m] = statistics.mean(values)
            row[m + "_seeds"] = values
        out.append(row)
    order = {a: i for i, a in enumerate(("none",) + KL_ARMS + W_ARMS)}
    return sorted(out, key=lambda r: (order.get(r["arm"], 99), r["beta"]))


def reference_row(state) -> dict:
    rows = [s["step0"] for s in state["seeds"].values()]
    return {m: statistics.mean(r[m] for r in rows) for m in MEASURES}


def noise(table, ref, n_completions) -> tuple[float, str]:
    """The reward difference below which two cells are not told apart: the seed spread
    (mean half-range of a cell's seeds) with two or more seeds, else the evaluation's own
    sampling error, bounded by ``sqrt(r(1 − r)/n)`` (a [0, 1] reward's variance is at most
    r(1 − r)) at the reference's reward r over the n held-out completions."""
    halves = [(max(r["reward_seeds"]) - min(r["reward_seeds"])) / 2 for r in table if len(r["reward_seeds"]) > 1]
    if halves:
        return statistics.mean(halves), "the seed spread"
    r = ref["reward"]
    return (r * (1 - r) / n_completions) ** 0.5, f"the sampling error of one evaluation's mean over {n_completions} completions"


def kl_curve(table, ref, arm) -> list[tuple[float, float]]:
    """(drift, reward) points of a KL arm, with the reference and the unpenalized run, by drift."""
    points = [(ref["drift"], ref["reward"])] + [(r["drift"], r["reward"]) for r in table if r["arm"] in (arm, "none")]
    return sorted(points)


def reward_at(curve, drift) -> float | None:
    """Linear interpolation of a curve's reward at ``drift`` (None outside its range); where
    the curve is not monotone in drift, the best reward reached at or below ``drift``'s segment."""
    best = None
    for (d0, r0), (d1, r1) in zip(curve, curve[1:]):
        if d0 <= drift <= d1:
            r = r0 if d1 == d0 else r0 + (r1 - r0) * (drift - d0) / (d1 - d0)
            best = r if best is None else max(best, r)
    return best


def comparisons(table, ref, sigma) -> list[dict]:
    out = []
    for row in table:
        if row["arm"] not in W_ARMS:
            continue
        for kl_arm in KL_ARMS:
            r_kl = reward_at(kl_curve(table, ref, kl_arm), row["drift"])
            if r_kl is None:
                verdict, delta = "outside the KL arm's drift range", None
            else:
                delta = row["reward"] - r_kl
                verdict = ("more reward" if delta > sigma else "less reward" if delta < -sigma
                           else "no difference within the noise")
            out.append({"arm": row["arm"], "beta": row["beta"], "drift": row["drift"], "reward": row["reward"],
                        "versus": kl_arm, "kl_reward_at_drift": r_kl, "delta": delta, "verdict": verdict})
    return out


def plot(table, ref, path: Path, sigma: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    none = [r for r in table if r["arm"] == "none"]
    for ax, x, label in ((axes[0], "drift", "semantic drift, 1 − cos to the reference (MiniLM), held-out"),
                         (axes[1], "kl_per_token", "exact KL(π‖π_ref) per token, held-out")):
        ax.scatter([ref[x]], [ref["reward"]], marker="*", s=160, c="k", label="reference (step 0)", zorder=5)
        ax.axhspan(ref["reward"] - sigma, ref["reward"] + sigma, color="k", alpha=0.07,
                   label="reference reward ± noise σ")
        if none:
            ax.scatter([none[0][x]], [none[0]["reward"]], marker="X", s=100, c="gray", label="no penalty", zorder=5)
        for arm in KL_ARMS + W_ARMS:
            rows = [r for r in table if r["arm"] == arm]
            if not rows:
                continue
            style = "--" if arm in KL_ARMS else "-"
            ax.plot([r[x] for r in rows], [r["reward"] for r in rows], style, marker="o", label=arm)
            for r in rows:
                ax.annotate(f"{r['beta']:g}", (r[x], r["reward"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("reward (vivid words), held-out")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, GRPO: reward against drift per penalty (labels: β in KL units; "
                 "mean over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(state, table, ref, comps, sigma, sigma_kind) -> str:
    o = state["options"]
    runs = list(state["runs"].values())
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (("none",) + KL_ARMS + W_ARMS).index(a))
    betas = sorted({r["beta_kl_units"] for r in runs if r["arm"] != "none"})
    mid = sum(len(r["evals"]) > 1 for r in runs)
    lines = [
        "# GRPO on a real language model: KL against Wasserstein penalties",
        "",
        f"**What this is: {state['label']}** — arms {', '.join(arms)}; β ∈ "
        f"{', '.join(f'{b:g}' for b in betas)} (KL units); seeds {', '.join(sorted({str(r['seed']) for r in runs}))}; "
        f"{len(runs)} runs. Made by `experiments/real_lm_grpo.py` "
        "(setup, reward and measures in its docstring and `experiments/real_lm_measures.py`):",
        "",
        f"    {COMMAND}",
        "",
        f"Machine: {state['machine'].get('cpu')}, {state['machine'].get('cores')} cores shared with other jobs "
        f"(device {state['device']}); torch {state['machine'].get('torch')}. Budget per run: {o['steps']} GRPO steps "
        f"of {o['prompts_per_step']} prompts × {o['group']} completions of ≤ {o['max_tokens']} tokens, the last "
        f"{o['train_blocks']} of 30 blocks and the final norm trained (embeddings / tied LM head frozen), Adam "
        f"lr {o['lr']:g}; evaluation on 12 held-out prompts × {o['eval_samples']} completions at step 0 and "
        f"{o['steps']} (and at step {o['steps'] // 2} in {mid} of the {len(runs)} runs). Mean time per step "
        f"{statistics.mean(r['seconds_per_step'] for r in runs):.1f} s (evaluations included); the sweep's "
        f"wall time {state.get('sweep_seconds', float('nan')) / 60:.0f} min in its last invocation.",
        "",
        "Strengths: k3 and exact KL at β; each Wasserstein penalty at β × s, s = mean KL / mean W on one "
        "generic move (the reference's logits plus N(0, 1) noise on every logit), so a generic move costs "
        "the same under every penalty at the same β:",
        "",
        "| penalty | W on the calibration move | s |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {v['value']:.4g} | {v['scale']:.4g} |" for a, v in state["scales"].items() if a != "kl"]
    lines += [f"| (exact KL on the same move) | {state['scales'].get('kl', float('nan')):.4g} | |", ""]
    lines += ["## Held-out measures at the end of training (mean over seeds)", "",
              "| arm | β (KL units) | reward | semantic drift | exact KL / token | ref perplexity | vivid words / "
              "completion | reward per seed |",
              "|---|---|---|---|---|---|---|---|",
              f"| reference (step 0) | | {ref['reward']:.3f} | {ref['drift']:.4f} | {ref['kl_per_token']:.4f} | "
              f"{ref['ref_perplexity']:.2f} | {ref['vivid_hits']:.2f} | |"]
    for r in table:
        lines.append(f"| {r['arm']} | {r['beta']:g} | {r['reward']:.3f} | {r['drift']:.4f} | {r['kl_per_token']:.4f} | "
                     f"{r['ref_perplexity']:.2f} | {r['vivid_hits']:.2f} | "
                     f"{', '.join(f'{v:.3f}' for v in r['reward_seeds'])} |")
    se = [r["evals"][-1] for r in runs if "drift_se" in r["evals"][-1]]
    if se:
        lines += ["", f"Standard errors of one evaluation's means (over its {12 * o['eval_samples']} completions), in the "
                  f"{len(se)} runs that record them: reward {min(e['reward_se'] for e in se):.3f}–"
                  f"{max(e['reward_se'] for e in se):.3f}, drift {min(e['drift_se'] for e in se):.3f}–"
                  f"{max(e['drift_se'] for e in se):.3f}."]
    lines += ["", "![reward against drift](../../docs/real_lm_grpo.png)", "",
              f"## Wasserstein against KL at the same semantic drift (noise σ = {sigma:.3f} reward: {sigma_kind})",
              "",
              "| penalty | β | drift | reward | versus | KL arm's reward at that drift | Δ | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        kl_r = "" if c["kl_reward_at_drift"] is None else f"{c['kl_reward_at_drift']:.3f}"
        delta = "" if c["delta"] is None else f"{c['delta']:+.3f}"
        lines.append(f"| {c['arm']} | {c['beta']:g} | {c['drift']:.4f} | {c['reward']:.3f} | {c['versus']} | {kl_r} | "
                     f"{delta} | {c['verdict']} |")
    lines += ["", "## Completions (held-out, final evaluation, seed of the first run)", ""]
    shown = set()
    for run in runs:
        key = (run["arm"], run["beta_kl_units"])
        if key in shown or (run["arm"] != "none" and run["beta_kl_units"] != max(o["strengths"])):
            continue
        shown.add(key)
        for c in run["evals"][-1]["completions"][:2]:
            text = c["text"].replace("\n", " ").replace("|", "/")
            lines.append(f"- **{run['arm']} β={run['beta_kl_units']:g}** — *{c['prompt']}* → {text}")
    lines.append("")
    return "\n".join(lines)


def write_report(state, *, redraw: bool = False, label: str | None = None, summary: str | None = None) -> dict:
    """Write the .json, .md and picture; ``redraw`` reads the state from the saved .json
    (``label``/``summary`` replace what it says the results are and what they show)."""
    if redraw:
        state = json.loads((RESULTS / f"{NAME}.json").read_text())
    if label is not None:
        state["label"] = label
    table = cells(state)
    ref = reference_row(state)
    sigma, sigma_kind = noise(table, ref, 12 * state["options"]["eval_samples"])
    comps = comparisons(table, ref, sigma)
    state.update(table=table, reference=ref, noise=sigma, noise_kind=sigma_kind, comparisons=comps)
    if summary is not None:
        state["summary"] = summary
    md = markdown(state, table, ref, comps, sigma, sigma_kind)
    if state.get("summary"):
        md = md.replace("## Held-out measures", f"## What it shows\n\n{state['summary']}\n\n## Held-out measures", 1)
    payload = {k: v for k, v in state.items() if k != "machine"}
    payload["machine"] = state["machine"]
    write_results(NAME, payload, md, RESULTS)
    plot(table, ref, PLOT, sigma)
    return state
