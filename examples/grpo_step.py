"""A GRPO step in plain PyTorch with a vocabmetric penalty in place of (or beside) KL.

For G completions ``o_i`` of each prompt, group-normalized advantages
``A_i = (r_i − mean_G r) / (std_G r + 1e-4)`` and, per completion token t,

    loss_{i,t} = −A_i · π_θ(o_t | ·) / sg[π_θ(o_t | ·)]  +  β · D(π_θ(· | o_<t), π_ref(· | o_<t))

averaged over each completion's tokens, then over completions (TRL's ``loss_type="grpo"``).
The first term's gradient is ``−A_i ∇log π_θ(o_t)`` (on-policy, one update per batch: the
PPO ratio is 1 and clipping never binds). ``D`` is any vocabmetric regularizer on the full
policy and reference logits; the exact KL is ``FullKL``, and TRL's k3 estimate is
``kl_estimate(logp, ref_logp, "k3")``.

Run it on a store (needs ``transformers``: ``pip install 'vocabmetric[trl]'``)::

    python examples/grpo_step.py runs/demo/metric.zarr --penalty tree --steps 5

It trains a randomly initialized two-layer Llama (built from a config: nothing is
downloaded) over the store's vocabulary, with prompts encoded by the store's tokenizer. The
reward, :func:`word_reward`, is the share of a completion's tokens that start a word
(a leading space, then a letter): it varies between the completions of a random model, so
the advantages are non-zero from the first step. The penalty is 0 at step 0 (the policy
is the reference) and grows as the policy moves away from it.
"""

from __future__ import annotations

import argparse
import copy

import torch

from vocabmetric.regularizers import aggregate, regularizer_from_store


def completion_mask(completions: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[B, T]`` bool: the tokens up to and including the first EOS."""
    is_eos = completions == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


def word_start_table(token_texts: list[str]) -> torch.Tensor:
    """``[V]`` bool: token ``i``'s text is a space followed by a letter (``" London"``)."""
    return torch.tensor([len(t) > 1 and t[0] == " " and t[1].isalpha() for t in token_texts])


def word_reward(word_start: torch.Tensor):
    """``reward_fn(completions [B, T], mask [B, T]) → [B]``: the share of each completion's
    tokens that start a word (a table from :func:`word_start_table`)."""

    def reward(completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hits = (word_start[completions] & mask).sum(-1)
        return hits / mask.sum(-1).clamp(min=1)

    return reward


def grpo_step(policy, reference, optimizer, prompt_ids, prompt_mask, reward_fn, penalty, *,
              beta: float = 0.05, group: int = 4, max_new_tokens: int = 16, temperature: float = 1.0,
              eos_id: int, pad_id: int) -> dict:
    """One on-policy GRPO update of ``policy``; returns the loss, mean reward and mean penalty.

    ``prompt_ids``/``prompt_mask`` are left-padded ``[P, L]``; ``reward_fn(completions [B, T],
    mask [B, T]) → [B]``; ``penalty(logits [n, V], ref_logits [n, V]) → [n]``.
    Cost: one generation, one policy forward/backward, one reference forward, and ``penalty``
    on the ``n`` completion tokens (one ``[n, V]`` logits tensor and its gradient).
    """
    ids, att = prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0)
    L = ids.shape[1]
    with torch.no_grad():
        seqs = policy.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=temperature,
                               top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    completions = seqs[:, L:]
    mask = completion_mask(completions, eos_id)
    full_mask = torch.cat([att, mask.long()], 1)
    rewards = reward_fn(completions, mask).float()
    grouped = rewards.view(-1, group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

    logits = policy(input_ids=seqs, attention_mask=full_mask).logits[:, L - 1 : -1] / temperature
    with torch.no_grad():
        ref_logits = reference(input_ids=seqs, attention_mask=full_mask).logits[:, L - 1 : -1] / temperature
    logp = logits.log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    surrogate = -advantages[:, None] * torch.exp(logp - logp.detach())
    d = penalty(logits[mask], ref_logits[mask])  # only the completion tokens: [n]
    per_token = surrogate + beta * logits.new_zeros(mask.shape).masked_scatter(mask, d)
    loss = aggregate(per_token, mask, "seq-mean-token-mean")

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            "penalty": d.detach().mean().item()}


def run(store_path: str, penalty_name: str = "tree", *, steps: int = 5, beta: float = 0.05, lr: float = 1e-3,
        seed: int = 0, log=print) -> list[dict]:
    """The script: ``steps`` GRPO steps of a random tiny Llama on a store; one dict per step
    (loss, reward, reward_std, penalty), each also passed to ``log`` as a line."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vocabmetric import load_tokenizer, open_store

    store = open_store(store_path)
    tok = load_tokenizer(store.tokenizer_spec)
    eos = max(tok.special_ids) if tok.special_ids else 0
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(vocab_size=store.vocab_size, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                          eos_token_id=eos, pad_token_id=eos, bos_token_id=eos))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    kw = {"support": 64} if penalty_name == "sinkhorn" else {}
    penalty = regularizer_from_store(store, penalty_name, **kw)
    texts = ["The weather in London", "My favourite colour is", "The error message said"]
    encoded = [torch.as_tensor(tok.encode(t), dtype=torch.long) for t in texts]
    width = max(len(e) for e in encoded)
    prompt_ids = torch.stack([torch.cat([torch.full((width - len(e),), eos), e]) for e in encoded])
    prompt_mask = torch.stack([torch.cat([torch.zeros(width - len(e)), torch.ones(len(e))]) for e in encoded]).long()
    reward = word_reward(word_start_table([store.token_text(i) for i in range(store.vocab_size)]))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    outs = []
    for step in range(steps):
        out = grpo_step(policy, reference, optimizer, prompt_ids, prompt_mask, reward, penalty,
                        beta=beta, eos_id=eos, pad_id=eos)
        log(f"step {step}: loss {out['loss']:+.4f}  reward {out['reward']:.3f} (std {out['reward_std']:.3f})  "
            f"{penalty_name} {out['penalty']:.3g}")
        outs.append(out)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--penalty", default="tree", choices=["sinkhorn", "tree", "sliced", "full_kl"])
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    run(args.store, args.penalty, steps=args.steps, beta=args.beta, lr=args.lr)


if __name__ == "__main__":
    main()
