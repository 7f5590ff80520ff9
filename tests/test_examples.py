"""The plain PyTorch GRPO recipe in examples/grpo_step.py, run for real on CPU."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")

from conftest import REPO, fast_tokenizer, lee_texts, tiny_llama  # noqa: E402
from vocabmetric.regularizers import regularizer_from_store  # noqa: E402


def load_recipe():
    spec = importlib.util.spec_from_file_location("grpo_step", REPO / "examples" / "grpo_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    recipe = load_recipe()
    completions = torch.tensor([[5, 7, 0, 0, 9], [0, 3, 0, 4, 4], [1, 2, 3, 4, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(recipe.completion_mask(completions, eos_id=0), expected)


@pytest.mark.parametrize("penalty", ["sinkhorn", "tree", "full_kl"])
def test_grpo_steps_penalize_drift_and_move_the_policy(penalty, small_build, small_store):
    recipe = load_recipe()
    tok = fast_tokenizer(small_build[0].parent / "tokenizer.json")
    tok.padding_side = "left"
    policy = tiny_llama(tok)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = tok([t[:40] for t in lee_texts()[:3]], return_tensors="pt", padding=True)
    reg = regularizer_from_store(small_store, penalty, **({"support": 32} if penalty == "sinkhorn" else {}))
    # a reward with spread from the first step: completion tokens among the 500 first merges
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-2)
    outs = [recipe.grpo_step(policy, reference, optimizer, batch["input_ids"], batch["attention_mask"],
                             lambda c, m: ((c < 500) & m).sum(-1), reg, beta=0.5, group=4, max_new_tokens=6,
                             eos_id=tok.eos_token_id, pad_id=tok.pad_token_id) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor([o["loss"], o["penalty"]])).all() for o in outs)
    assert outs[0]["penalty"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert outs[-1]["penalty"] > 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))


def test_the_script_as_run_rewards_with_spread_and_penalizes_after_the_first_step(small_build, monkeypatch, capsys):
    """`python examples/grpo_step.py STORE --penalty tree --steps 3`, as a newcomer runs it:
    the reward differs between completions (so the advantages move the policy), the penalty
    is 0 at step 0 and > 0 from step 1, and no tensor-with-grad conversion warning."""
    import re
    import warnings

    recipe = load_recipe()
    monkeypatch.setattr("sys.argv", ["grpo_step.py", str(small_build[1].store_path), "--penalty", "tree", "--steps", "3"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe.main()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3
    parsed = [re.search(r"reward ([\d.]+) \(std ([\d.]+)\)\s+tree ([\d.e+-]+)", ln) for ln in lines]
    assert all(parsed), lines
    reward_std = [float(m.group(2)) for m in parsed]
    penalty = [float(m.group(3)) for m in parsed]
    assert reward_std[0] > 0.01, lines  # a reward with spread on a random model
    assert penalty[0] == 0.0 and penalty[1] > 1e-4 and penalty[2] > 1e-4, lines
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
