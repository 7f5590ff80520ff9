"""TRL's ``GRPOTrainer`` with a vocabmetric penalty on the full policy and reference logits.

TRL penalizes drift with a sampled-token KL estimate (k3, coefficient ``beta``). This
trainer adds ``penalty_beta · D(π_θ(·|x_<t), π_ref(·|x_<t))`` per completion token, where
``D`` is a vocabmetric regularizer (Sinkhorn divergence, Tree- or Sliced-Wasserstein over a
semantic ground cost, or the exact full-vocabulary KL), and logs the mean of ``D`` beside
TRL's own metrics as ``vocabmetric/<penalty>``. Set TRL's ``beta=0`` to replace the KL
term, or keep it to add both::

    from vocabmetric.integrations.trl import VocabMetricGRPOConfig, VocabMetricGRPOTrainer

    args = VocabMetricGRPOConfig(output_dir="out", beta=0.0, penalty="sinkhorn",
                                 penalty_beta=0.05, metric_store="metric.zarr",
                                 penalty_kwargs={"eps": 0.05, "support": 64})
    trainer = VocabMetricGRPOTrainer(model=model, reward_funcs=reward, args=args,
                                     train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

How it works. TRL's fused LM head never materializes the ``[B, T, V]`` logits; this
trainer captures the backbone's last hidden states during TRL's own forward (a forward
hook: no second pass through the backbone), projects the completion positions through
the LM head (with the model's logit scale, soft-capping and TRL's ``temperature``), and
runs the reference model under ``no_grad`` on the same sequences. The per-token values are
reduced exactly as TRL reduces its per-token loss for the configured ``loss_type``, so the
penalty enters the loss where TRL's KL term would. Extra cost per step: one reference
forward, one ``[n_tokens, V]`` logits tensor with its gradient, and the regularizer.

Checks, all before a wrong number could reach the loss: the LM head's width against the
metric's vocabulary (a head padded past the tokenizer, as Qwen's, is cut to the metric's
V, and a log line says so), the tokenizer's fingerprint against the metric's, and at the
first step the captured logits against the model's own forward. A NaN in the logits stops
the step with an error that names the regularizer.

Not supported: PEFT adapters as the implicit reference (pass ``ref_model=``), and
vision-language inputs.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, FingerprintMismatch, VocabMetricError
from ..regularizers.factory import regularizer_from_store
from ..regularizers.registry import PENALTIES, penalty_class, penalty_name
from ..vocab.fingerprint import check_fingerprint, tokenizer_fingerprint

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("vocabmetric.integrations.trl needs TRL: pip install 'vocabmetric[trl]'") from exc

LOG = logging.getLogger(__name__)

__all__ = ["VocabMetricGRPOConfig", "VocabMetricGRPOTrainer", "tokenizer_fingerprint"]


@dataclass
class VocabMetricGRPOConfig(GRPOConfig):
    """:class:`trl.GRPOConfig` plus the vocabmetric penalty.

    Parameters
    ----------
    penalty : {"sinkhorn", "tree", "sliced", "full_kl"}
        The regularizer ``D`` (see :func:`~vocabmetric.regularizers.regularizer_from_store`).
    penalty_beta : float
        Its coefficient; the loss gains ``penalty_beta · D`` per completion token.
    metric_store : str
        Path of the store built for the model's tokenizer (not needed for ``full_kl``, nor
        when the trainer is given ``regularizer=``).
    penalty_metric : str, optional
        Sinkhorn's ground cost (default ``"knn"``).
    penalty_kwargs : dict
        Keyword arguments of the regularizer, e.g. ``{"eps": 0.05, "support": 64}``.
    """

    penalty: str = field(default="sinkhorn", metadata={"help": f"One of {PENALTIES}."})
    penalty_beta: float = field(default=0.05, metadata={"help": "Coefficient of the vocabmetric penalty."})
    metric_store: str | None = field(default=None, metadata={"help": "Path of the vocabmetric store."})
    penalty_metric: str | None = field(default=None, metadata={"help": "Sinkhorn's metric (default knn)."})
    penalty_kwargs: dict = field(default_factory=dict, metadata={"help": "Arguments of the regularizer."})

    def __post_init__(self):
        super().__post_init__()
        penalty_class(self.penalty, where="VocabMetricGRPOConfig")
        if not self.penalty_beta >= 0:
            raise ConfigError(f"VocabMetricGRPOConfig: penalty_beta must be >= 0, got {self.penalty_beta!r}")


class VocabMetricGRPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` whose loss adds ``penalty_beta · D(π_θ, π_ref)`` per token.

    Parameters
    ----------
    model, reward_funcs, args, **kwargs
        As for :class:`trl.GRPOTrainer`; ``args`` is a :class:`VocabMetricGRPOConfig`.
    regularizer : nn.Module, optional
        A ready regularizer (``reg(logits, ref_logits, fingerprint=)`` → per position);
        default: built from ``args`` with ``regularizer_from_store``.
    ref_model : PreTrainedModel, optional
        The reference π_ref. Default: TRL's reference model when ``beta != 0``, else a
        frozen copy of the policy taken at construction.
    """

    def __init__(self, model, reward_funcs, args: VocabMetricGRPOConfig | None = None, *,
                 regularizer: nn.Module | None = None, ref_model: nn.Module | None = None, **kwargs):
        if args is not None and not isinstance(args, VocabMetricGRPOConfig):
            raise ConfigError(
                f"VocabMetricGRPOTrainer: args must be a VocabMetricGRPOConfig, got {type(args).__name__}"
            )
        if args is None:
            args = VocabMetricGRPOConfig(output_dir="vocabmetric-grpo")
        if regularizer is None:
            regularizer = _regularizer_from_config(args)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.regularizer = regularizer
        self.penalty_beta = float(args.penalty_beta)
        self.penalty_name = penalty_name(regularizer)
        self._checked_head = False
        policy = self._policy_model(self.model)
        self._width = self._check_width(policy)
        self._fingerprint = self._check_fingerprint()
        if ref_model is not None:
            self.penalty_ref_model = self.accelerator.prepare_model(ref_model.eval().requires_grad_(False),
                                                                    evaluation_mode=True)
        elif self.ref_model is not None:
            self.penalty_ref_model = self.ref_model
        else:  # a frozen copy of the policy as it is now
            self.penalty_ref_model = self.accelerator.prepare_model(
                copy.deepcopy(policy).eval().requires_grad_(False), evaluation_mode=True)

    # -- construction checks ---------------------------------------------------------------
    def _policy_model(self, model) -> nn.Module:
        """The transformers model inside any accelerate/DDP wrapper (and PEFT's base model)."""
        inner = self.accelerator.unwrap_model(model)
        if hasattr(inner, "get_base_model"):  # PEFT
            inner = inner.get_base_model()
        return inner

    def _check_width(self, policy) -> int:
        """The logits width the penalty uses: the LM head's, or the metric's V when the head
        is padded past the tokenizer."""
        V = self.regularizer.vocab_size
        head = policy.get_output_embeddings().weight.shape[0]
        if V is None or head == V:
            return head
        n_tokens = len(self.processing_class) if self.processing_class is not None else None
        if head > V and n_tokens is not None and n_tokens <= V:
            LOG.info("vocabmetric: the LM head has %d outputs, the tokenizer %d ids and the metric %d; "
                     "the penalty uses the first %d logits (the rest are padding)", head, n_tokens, V, V)
            return V
        raise FingerprintMismatch(
            f"VocabMetricGRPOTrainer: the model's LM head has {head} outputs but the {self.penalty_name} "
            f"metric covers {V} token ids; build the metric with this model's tokenizer "
            f"(tokenizer: {n_tokens} ids)"
        )

    def _check_fingerprint(self) -> str | None:
        got = tokenizer_fingerprint(self.processing_class)
        check_fingerprint(getattr(self.regularizer, "fingerprint", None), got, "VocabMetricGRPOTrainer",
                          source=f"processing_class (for the {self.penalty_name} metric)")
        return got

    # -- the loss ------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        policy = self._policy_model(model)
        captured: list[torch.Tensor] = []
        handle = policy.base_model.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            handle.remove()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.penalty_beta > 0):
            per_token, mask = self._penalty_per_token(policy, inputs, captured)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][f"vocabmetric/{self.penalty_name}"].append(self._global_mean(per_token.detach(), mask))
        if self.penalty_beta == 0:  # logged, not penalized
            return loss
        return loss + self.penalty_beta * self._reduce_like_trl(per_token, mask, inputs, mode)

    def _penalty_per_token(self, policy, inputs, captured) -> tuple[torch.Tensor, torch.Tensor]:
        """``D`` at every completion token ``[B, T]`` (0 where masked) and the bool mask."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        T = completion_ids.size(1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.bool()
        if len(captured) != 1:
            raise VocabMetricError(
                f"VocabMetricGRPOTrainer: expected one backbone forward in TRL's loss, saw {len(captured)}; "
                "this TRL version computes the loss differently — please report it"
            )
        hidden = captured[0][:, -T - 1 : -1]  # the positions that predict the completion tokens
        logits = self._head(policy, hidden[mask])
        with torch.no_grad():
            ref_logits = self._model_logits(self.penalty_ref_model, input_ids, attention_mask, T)[mask]
        values = self.regularizer(logits, ref_logits, fingerprint=self._fingerprint)  # NaN logits raise here
        if not self._checked_head:
            self._check_head(policy, input_ids, attention_mask, T, logits.detach(), mask)
        per_token = values.new_zeros(mask.shape).masked_scatter(mask, values)
        return per_token, mask

    def _head(self, policy, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on captured hidden states, as the model's forward computes logits
        (same autocast), divided by TRL's sampling temperature; cut to the metric's width."""
        head = policy.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        with self.accelerator.autocast():  # as the model's own forward (and TRL's fp32 head cast, if set)
            logits = head(hidden)
        config = policy.config.get_text_config()
        scale = _logit_scale(config)
        if scale != 1.0:
            logits = logits * scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits[..., : self._width].float() / self.temperature

    def _model_logits(self, model, input_ids, attention_mask, T) -> torch.Tensor:
        """Logits ``[B, T, width]`` at the completion positions from the model's own forward
        (the class's forward: TRL patches the instance's with a fused head)."""
        inner = self._policy_model(model)
        with self.accelerator.autocast():
            out = type(inner).forward(inner, input_ids=input_ids, attention_mask=attention_mask,
                                      logits_to_keep=T + 1, use_cache=False)
        return out.logits[:, :-1, : self._width].float() / self.temperature

    def _check_head(self, policy, input_ids, attention_mask, T, logits, mask) -> None:
        """First step only: the captured-hidden-state logits must equal the model's own."""
        with torch.no_grad():
            own = self._model_logits(policy, input_ids, attention_mask, T)[mask]
        if not torch.allclose(logits, own, rtol=1e-3, atol=1e-3 * float(own.abs().max().clamp_min(1))):
            raise VocabMetricError(
                "VocabMetricGRPOTrainer: the logits rebuilt from the backbone's hidden states differ from "
                f"the model's own forward (max |diff| {float((logits - own).abs().max()):.3g}) for "
                f"{type(policy).__name__}; its logit head is not supported — please report it"
            )
        self._checked_head = True

    def _reduce_like_trl(self, per_token: torch.Tensor, mask: torch.Tensor, inputs, mode: str) -> torch.Tensor:
        """The scalar TRL would get from ``per_token`` as its per-token loss, for ``loss_type``."""
        m = mask.to(per_token.dtype)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kind = self.loss_type
        if kind in ("grpo", "sapo"):
            return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / accumulation
        if kind == "bnpo":
            return (per_token * m).sum() / m.sum().clamp(min=1.0) / accumulation
        if kind == "dr_grpo":
            return (per_token * m).sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if kind in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return (per_token * m).sum() / normalizer
        if kind == "luspo":
            return (per_token * m).sum(-1).mean() / accumulation
        raise ConfigError(f"VocabMetricGRPOTrainer: loss_type {kind!r} is not supported by the penalty")

    def _global_mean(self, per_token: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of ``D`` over the completion tokens of every process (the logged value)."""
        local = torch.stack([(per_token * mask).sum(), mask.sum().to(per_token.dtype)])
        total = self.accelerator.reduce(local, reduction="sum")
        return float(total[0] / total[1].clamp(min=1.0))


def _regularizer_from_config(args: VocabMetricGRPOConfig) -> nn.Module:
    if not penalty_class(args.penalty).needs_store:
        return regularizer_from_store(None, args.penalty, **args.penalty_kwargs)
    if not args.metric_store:
        raise ConfigError(
            f"VocabMetricGRPOConfig: penalty {args.penalty!r} needs metric_store (the path of a "
            "store built by `vocabmetric build` for the model's tokenizer), or pass regularizer="
        )
    from ..store import open_store

    return regularizer_from_store(open_store(args.metric_store), args.penalty, metric=args.penalty_metric,
                                  **args.penalty_kwargs)


def _logit_scale(config) -> float:
    """The multiplier a model applies to its LM head output (as TRL's fused head reads it)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0
