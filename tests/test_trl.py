"""VocabMetricGRPOTrainer: real GRPOTrainer steps on CPU with a tiny Llama built from a config
and the small store's own tokenizer; every logged penalty is recomputed independently."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from conftest import fast_tokenizer, lee_texts, tiny_llama, train_bpe  # noqa: E402
from vocabmetric.errors import ConfigError, FingerprintMismatch, VocabMetricError  # noqa: E402
from vocabmetric.integrations.trl import (  # noqa: E402
    VocabMetricGRPOConfig,
    VocabMetricGRPOTrainer,
    tokenizer_fingerprint,
)
from vocabmetric.regularizers import regularizer_from_store  # noqa: E402

PENALTY_KWARGS = {
    "sinkhorn": {"eps": 0.1, "support": 32},
    "tree": {},
    "sliced": {"n_projections": 16},
    "full_kl": {},
}


@pytest.fixture(scope="module")
def tokenizer(small_build):
    return fast_tokenizer(small_build[0].parent / "tokenizer.json")


def prompts():
    return datasets.Dataset.from_dict({"prompt": [t[:50] for t in lee_texts()[:16]]})


def reward_the(completions, **kwargs):
    """A real reward: how often the completion says 'the'."""
    return [float(c.count("the")) for c in completions]


def config(tmp_path, penalty="sinkhorn", store=None, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=3, learning_rate=5e-2, report_to=[], logging_steps=1,
                use_cpu=True, bf16=False, beta=0.0, save_strategy="no", seed=0, penalty=penalty, penalty_beta=0.5,
                metric_store=None if store is None else str(store.path), penalty_kwargs=PENALTY_KWARGS[penalty])
    base.update(kw)
    return VocabMetricGRPOConfig(**base)


class Recording(VocabMetricGRPOTrainer):
    """Keeps each step's inputs and the policy's parameters as they were for that loss."""

    def _compute_loss(self, model, inputs):
        self.seen = getattr(self, "seen", [])
        state = {k: v.detach().clone() for k, v in self._policy_model(model).state_dict().items()}
        self.seen.append(({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}, state))
        return super()._compute_loss(model, inputs)


def independent_penalty(reg, policy, reference, inputs, temperature):
    """Mean D over completion tokens, from the models' plain forward passes."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        z = type(policy).forward(policy, input_ids=ids, attention_mask=att).logits[:, -T - 1 : -1] / temperature
        r = type(reference).forward(reference, input_ids=ids, attention_mask=att).logits[:, -T - 1 : -1] / temperature
        return float(reg(z[mask], r[mask]).mean())


@pytest.mark.parametrize("penalty", ["sinkhorn", "tree", "sliced", "full_kl"])
def test_grpo_steps_log_the_penalty_an_independent_computation_gets(penalty, small_store, tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    initial = copy.deepcopy(model)
    args = config(tmp_path, penalty, small_store)
    trainer = Recording(model=model, reward_funcs=reward_the, args=args, train_dataset=prompts(),
                        processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if f"vocabmetric/{penalty}" in h]
    assert len(logs) == 3 == len(trainer.seen)
    reg = regularizer_from_store(small_store, penalty, **PENALTY_KWARGS[penalty])
    for log, (inputs, state) in zip(logs, trainer.seen):
        assert torch.isfinite(torch.tensor(log["loss"]))
        policy = copy.deepcopy(initial)
        policy.load_state_dict(state)
        expected = independent_penalty(reg, policy, initial, inputs, args.temperature)
        assert log[f"vocabmetric/{penalty}"] == pytest.approx(expected, rel=2e-3, abs=1e-6)
    # step 1 is at the reference; the policy then moves away and pays for it
    assert logs[0][f"vocabmetric/{penalty}"] == pytest.approx(0.0, abs=1e-5)
    assert logs[-1][f"vocabmetric/{penalty}"] > 1e-4
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters())]
    assert all(moved)
    # the reference is a frozen copy of the initial policy
    for a, b in zip(trainer.penalty_ref_model.parameters(), initial.parameters()):
        assert torch.equal(a, b) and not a.requires_grad


def test_on_policy_loss_is_beta_times_the_penalty(small_store, tokenizer, tmp_path):
    """On-policy GRPO's surrogate is 0 (advantages sum to 0 in each group), so the loss TRL
    logs is exactly penalty_beta · mean D when every completion has the full length."""
    args = config(tmp_path, "tree", small_store, penalty_beta=2.0)
    trainer = VocabMetricGRPOTrainer(model=tiny_llama(tokenizer), reward_funcs=reward_the, args=args,
                                     train_dataset=prompts(), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "vocabmetric/tree" in h]
    full = [h for h in logs if h["completions/min_length"] == args.max_completion_length]
    assert full and logs[-1]["vocabmetric/tree"] > 0
    for h in full:
        assert h["loss"] == pytest.approx(2.0 * h["vocabmetric/tree"], rel=1e-3, abs=1e-6)


def test_bf16_mixed_precision_policy_and_reference_agree_at_the_start(small_store, tokenizer, tmp_path):
    """TRL's default on CPU and GPU is bf16 autocast: the reference runs under the same
    autocast as the policy, so a policy equal to its reference pays ~0, not bf16 noise."""
    args = config(tmp_path, "tree", small_store, bf16=True, max_steps=1, learning_rate=0.0)
    trainer = VocabMetricGRPOTrainer(model=tiny_llama(tokenizer), reward_funcs=reward_the, args=args,
                                     train_dataset=prompts(), processing_class=tokenizer)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "vocabmetric/tree" in h]
    assert log["vocabmetric/tree"] < 1e-6


def test_a_padded_lm_head_is_cut_to_the_metric(small_store, tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vocabmetric")
    model = tiny_llama(tokenizer, vocab_size=small_store.vocab_size + 24)  # as Qwen pads its head
    trainer = VocabMetricGRPOTrainer(model=model, reward_funcs=reward_the, args=config(tmp_path, "sliced", small_store,
                                     max_steps=1), train_dataset=prompts(), processing_class=tokenizer)
    assert "the penalty uses the first" in caplog.text
    trainer.train()
    assert any("vocabmetric/sliced" in h for h in trainer.state.log_history)


def test_a_narrower_lm_head_is_refused_at_construction(small_store, tokenizer, tmp_path):
    with pytest.raises(FingerprintMismatch, match=f"LM head has 900 outputs.*covers {small_store.vocab_size}"):
        VocabMetricGRPOTrainer(model=tiny_llama(tokenizer, vocab_size=900), reward_funcs=reward_the,
                               args=config(tmp_path, "tree", small_store), train_dataset=prompts(),
                               processing_class=tokenizer)


def test_another_tokenizer_of_the_same_width_is_refused(small_store, tokenizer, tmp_path):
    other = fast_tokenizer(train_bpe(tmp_path / "other.json", texts=[t[::-1] for t in lee_texts()]))
    assert len(other) == len(tokenizer) and tokenizer_fingerprint(other) != small_store.fingerprint
    assert tokenizer_fingerprint(tokenizer) == small_store.fingerprint
    with pytest.raises(FingerprintMismatch, match="another tokenizer"):
        VocabMetricGRPOTrainer(model=tiny_llama(other), reward_funcs=reward_the, args=config(tmp_path, "sinkhorn",
                               small_store), train_dataset=prompts(), processing_class=other)


def test_nan_logits_stop_the_step_naming_the_regularizer(small_store, tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    trainer = VocabMetricGRPOTrainer(model=model, reward_funcs=reward_the, args=config(tmp_path, "sinkhorn", small_store),
                                     train_dataset=prompts(), processing_class=tokenizer)

    def poison(module, args, out):  # only the training forward (generation runs without grad)
        if torch.is_grad_enabled():
            out[0][:, -2] = float("nan")  # a position that predicts a completion token
        return out

    model.model.register_forward_hook(poison)
    with pytest.raises(VocabMetricError, match="SinkhornDivergence: policy logits contains? NaN"):
        trainer.train()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown penalty 'wasserstein'"):
        VocabMetricGRPOConfig(output_dir=str(tmp_path), penalty="wasserstein", use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match="needs metric_store"):
        VocabMetricGRPOTrainer(model=None, reward_funcs=reward_the,
                               args=VocabMetricGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(ConfigError, match="penalty_beta must be >= 0"):
        VocabMetricGRPOConfig(output_dir=str(tmp_path), penalty_beta=-1.0, use_cpu=True, report_to=[])


def constant_reward(completions, **kwargs):
    """Every completion alike: GRPO's advantages are 0, so the penalty is the only gradient."""
    return [1.0] * len(completions)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_penalty_trains_through_a_frozen_tied_head(small_store, tokenizer, tmp_path, checkpointing):
    """As experiments/real_lm_grpo.py trains SmolLM2: tied embeddings = LM head frozen, only the
    last block trained. The penalty's gradient must reach that block through the hidden
    states: with a constant reward it is the whole loss, and the policy goes back toward the
    reference (the KL on a fixed batch falls), the frozen weights untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    reference = LlamaForCausalLM(cfg).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the policy starts away from the reference, in the block it may train
        for p in policy.model.layers[-1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    policy.requires_grad_(False)
    policy.model.layers[-1].requires_grad_(True)
    assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
    start = copy.deepcopy(policy)
    args = config(tmp_path, "full_kl", max_steps=4, learning_rate=2e-2, penalty_beta=1.0,
                  gradient_checkpointing=checkpointing)
    trainer = Recording(model=policy, reward_funcs=constant_reward, args=args, train_dataset=prompts(),
                        processing_class=tokenizer, ref_model=reference)
    trainer.train()
    reg = regularizer_from_store(None, "full_kl")
    inputs, _ = trainer.seen[0]
    before = independent_penalty(reg, start, reference, inputs, args.temperature)
    after = independent_penalty(reg, policy, reference, inputs, args.temperature)
    assert before > 1e-3 and after < 0.7 * before
    for name, p in policy.named_parameters():
        moved = not torch.equal(p, dict(start.named_parameters())[name])
        assert moved == name.startswith("model.layers.1."), name
