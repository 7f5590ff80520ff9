"""verl loss modes ``vocabmetric_sinkhorn``, ``vocabmetric_tree``, ``vocabmetric_sliced``.

verl's on-policy distillation is the one path that hands a loss the policy logits with
grad. With ``use_task_rewards=True`` and ``use_policy_gradient=False`` the actor loss is

.. math::

    L = L_{PPO} + β · \\mathrm{agg}_{t ∈ response}\\big(D(π_θ(·|x_{<t}), π_{ref}(·|x_{<t}))\\big),

``β = distillation_loss_coef``, ``agg`` verl's ``loss_agg_mode`` over the response mask,
``π_ref`` the teacher's top-k ``(ids, logprobs)`` (the initial checkpoint served by
vLLM/SGLang, never weight-synced), ``D`` a vocabmetric penalty. verl runs it in two stages:

1. in the engine's logits processor, ``distillation_ppo_loss(..., student_logits=z)`` calls
   ``compute_topk_loss``, which verl 0.9.1 hard-wires per strategy to its top-k forward KL.
   :func:`register` wraps that module function: for a vocabmetric mode it returns
   :func:`penalty_topk`'s per-position ``D`` ``(1, nnz)`` (``z`` is ``(1, nnz, V)`` for FSDP,
   vocab-sharded ``(1 or B, nnz/cp, V/tp)`` for Megatron), every other mode is untouched;
2. the registered loss function (:func:`penalty_per_token`) turns it into ``[B, T_resp]``
   and logs ``vocabmetric/<penalty>``; verl aggregates and adds ``β ·`` it.

Cost per micro-batch: the penalty on ``nnz`` positions (prompt and response: verl's
processor sees every position; the mask selects the response afterwards) and its
gradient ``[nnz, V]``; under tensor parallelism see :mod:`.tensor_parallel`.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

import torch

from ...errors import ConfigError, VocabMetricError
from ...regularizers.factory import regularizer_from_store
from .tensor_parallel import sharded_penalty
from .topk import reference_topk

try:
    import verl.trainer.distillation.losses as verl_losses
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("vocabmetric.integrations.verl needs verl: pip install 'vocabmetric[verl]'") from exc

LOG = logging.getLogger(__name__)

#: verl loss mode → vocabmetric penalty.
LOSS_MODES = {"vocabmetric_sinkhorn": "sinkhorn", "vocabmetric_tree": "tree", "vocabmetric_sliced": "sliced"}
#: The key of the reference's top-k mass in verl's model output; its presence also proves
#: that the logits processor ran this module's penalty (not a fused kernel's forward KL).
MASS_KEY = "vocabmetric_reference_mass"

_CUT_LOGGED: set = set()


@lru_cache(maxsize=None)
def open_cached_store(path: str):
    """The store at ``path``, opened once per process (each Ray worker opens its own)."""
    from ...store import open_store

    return open_store(path)


@lru_cache(maxsize=None)
def _penalty(mode: str, store_path: str, metric: str | None, kwargs_json: str):
    name = LOSS_MODES[mode]
    return regularizer_from_store(open_cached_store(store_path), name, metric=metric, **json.loads(kwargs_json))


def penalty_for(loss_config: Any):
    """The penalty of a :class:`~.config.VocabMetricLossConfig`, built once per process."""
    kwargs = json.dumps(dict(loss_config.penalty_kwargs or {}), sort_keys=True)
    return _penalty(loss_config.loss_mode, str(loss_config.metric_store), loss_config.penalty_metric, kwargs)


# -- stage 1: the logits processor --------------------------------------------------------
def penalty_topk(config, distillation_config, data, student_logits: torch.Tensor, data_format: str) -> dict:
    """``{"distillation_losses": D (B, n), MASS_KEY: Σ q_topk (B, n)}`` for the policy logits
    ``student_logits (B, n, V or V/tp)`` against ``data["teacher_ids"/"teacher_logprobs"]``."""
    loss_config = distillation_config.distillation_loss
    where = f"verl loss_mode {loss_config.loss_mode}"
    if not hasattr(loss_config, "metric_store"):
        raise ConfigError(f"{where}: set distillation.distillation_loss._target_="
                          "vocabmetric.integrations.verl.VocabMetricLossConfig (see docs/verl.md)")
    check_temperature(data, where)
    penalty = penalty_for(loss_config)
    ids, logprobs = _teacher_topk(config.strategy, data, data_format)
    if ids.shape[:2] != student_logits.shape[:2]:
        raise VocabMetricError(f"{where}: teacher top-k {tuple(ids.shape)} does not match the policy logits "
                               f"{tuple(student_logits.shape)}")
    V = penalty.vocab_size
    ids, logprobs, valid = reference_topk(ids, logprobs, V)
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    group, tp = _tensor_parallel_group(config.strategy)
    values = logits.new_zeros(logits.shape[0], dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if valid.any():
        rows = valid.nonzero().flatten()
        if tp > 1:
            values = values.index_put((rows,), sharded_penalty(penalty, logits[rows], ids[rows], logprobs[rows],
                                                               vocab_size=V, group=group))
        else:
            z = _cut_to_vocab(logits[rows], V, where)
            values = values.index_put((rows,), penalty(z, (ids[rows], logprobs[rows])))
    mass = torch.where(valid, logprobs.float().exp().sum(-1), torch.zeros((), device=logprobs.device))
    shape = student_logits.shape[:2]
    return {"distillation_losses": values.reshape(shape), MASS_KEY: mass.reshape(shape)}


def check_temperature(data, where: str) -> None:
    """Raise unless the batch's rollout temperature is 1 (verl scales the logits by it)."""
    if "temperature" not in data.keys():
        return
    temperature = data["temperature"]  # a float (verl's non-tensor data) or a per-sample tensor
    if temperature is None:
        return
    if torch.is_tensor(temperature):
        ok = bool((temperature == 1).all())
        shown = temperature.flatten()[0].item() if temperature.numel() else temperature
    else:
        ok, shown = float(temperature) == 1.0, temperature
    if not ok:
        raise ConfigError(temperature_message(where, shown))


def temperature_message(where: str, temperature: Any) -> str:
    return (f"{where}: the rollout temperature is {temperature}, but a penalty against the reference needs 1: "
            "verl divides the policy logits by it, so the penalty would compare the reference with a "
            "sharpened or flattened policy; set actor_rollout_ref.rollout.temperature=1.0")


def _teacher_topk(strategy: str, data, data_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher tensors aligned with this rank's logits, as verl's own top-k KL aligns them."""
    ids, logprobs = data["teacher_ids"], data["teacher_logprobs"]
    if strategy == "megatron":
        from verl.models.mcore.util import preprocess_bshd_engine, preprocess_thd_engine

        split = preprocess_thd_engine if data_format == "thd" else preprocess_bshd_engine
        return split(ids, pre_process=True)[0], split(logprobs, pre_process=True)[0]
    if ids.is_nested:
        ids, logprobs = ids.values().unsqueeze(0), logprobs.values().unsqueeze(0)
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    if get_ulysses_sequence_parallel_world_size() > 1:
        ids, logprobs = slice_input_tensor(ids, dim=1), slice_input_tensor(logprobs, dim=1)
    return ids, logprobs


def _tensor_parallel_group(strategy: str):
    """``(group, size)`` of the vocab-parallel logits (Megatron's TP group; FSDP gathers)."""
    if strategy != "megatron":
        return None, 1
    from megatron.core.parallel_state import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_group(), get_tensor_model_parallel_world_size()


def _cut_to_vocab(logits: torch.Tensor, V: int, where: str) -> torch.Tensor:
    """The first ``V`` logits of a head padded past the tokenizer (logged once); an error
    when the head is narrower than the store."""
    width = logits.shape[-1]
    if width == V:
        return logits
    if width < V:
        from ...errors import FingerprintMismatch

        raise FingerprintMismatch(f"{where}: the policy logits have {width} entries but the store covers {V} "
                                  "token ids; build the store with the actor's tokenizer")
    if (width, V) not in _CUT_LOGGED:
        _CUT_LOGGED.add((width, V))
        LOG.info("vocabmetric: the LM head has %d outputs and the store %d token ids; the penalty uses the first "
                 "%d logits (the rest are padding)", width, V, V)
    return logits[..., :V]


# -- stage 2: the registered loss ----------------------------------------------------------
def penalty_per_token(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict]:
    """``(D [B, T_resp], metrics)``: stage 1's values at the response positions; logs
    ``vocabmetric/<penalty>`` (mean over response tokens) and ``vocabmetric/reference_mass``."""
    loss_config = distillation_config.distillation_loss
    if MASS_KEY not in model_output:
        raise VocabMetricError(
            f"verl loss_mode {loss_config.loss_mode}: the model output holds no vocabmetric penalty; the logits "
            "processor did not run it (fused kernels compute verl's own top-k KL: set "
            "actor_rollout_ref.model.use_fused_kernels=False)")
    values = no_padding_2_padding(model_output["distillation_losses"], data)
    mass = no_padding_2_padding(model_output[MASS_KEY], data)
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(False) if mask.is_nested else mask).bool()
    name = LOSS_MODES[loss_config.loss_mode]
    metrics = {
        f"vocabmetric/{name}": Metric(AggregationType.MEAN, values[mask].detach().mean()),
        "vocabmetric/reference_mass": Metric(AggregationType.MEAN, mass[mask].detach().mean()),
    }
    return values, metrics


# -- registration ---------------------------------------------------------------------------
def _compute_topk_loss(config, distillation_config, data, student_logits, data_format):
    """verl's ``compute_topk_loss``, with the vocabmetric modes routed to :func:`penalty_topk`."""
    if distillation_config.distillation_loss.loss_mode in LOSS_MODES:
        return penalty_topk(config, distillation_config, data, student_logits, data_format)
    return _compute_topk_loss.verl_original(config, distillation_config, data, student_logits, data_format)


def register() -> None:
    """Register the loss modes with verl's registry and route its top-k stage; idempotent
    (a second call, or a second import path, changes nothing)."""
    if verl_losses.compute_topk_loss is not _compute_topk_loss:
        _compute_topk_loss.verl_original = verl_losses.compute_topk_loss
        verl_losses.compute_topk_loss = _compute_topk_loss
    todo = []
    for mode in LOSS_MODES:
        present = verl_losses.DISTILLATION_LOSS_REGISTRY.get(mode)
        if present is None:
            todo.append(mode)
        elif getattr(present, "__qualname__", None) != penalty_per_token.__qualname__:
            raise VocabMetricError(f"verl loss_mode {mode!r} is already registered by {present!r}")
    if todo:
        settings = verl_losses.DistillationLossSettings(names=todo, use_topk=True)
        verl_losses.register_distillation_loss(settings)(penalty_per_token)


register()
