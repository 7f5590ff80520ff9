"""The loss config of the vocabmetric modes, and the checks it runs before step one.

verl builds ``distillation.distillation_loss`` with Hydra from its ``_target_``; pointing it
at :class:`VocabMetricLossConfig` adds the vocabmetric settings (a plain
``DistillationLossConfig`` refuses unknown keys) and runs the checks where verl builds the
config — on the driver before any worker starts, and again on each worker::

    distillation.distillation_loss._target_=vocabmetric.integrations.verl.VocabMetricLossConfig
    distillation.distillation_loss.loss_mode=vocabmetric_tree
    +distillation.distillation_loss.metric_store=/data/qwen-metric.zarr
    '+distillation.distillation_loss.tokenizer_path=${actor_rollout_ref.model.path}'
    '+distillation.distillation_loss.rollout_temperature=${actor_rollout_ref.rollout.temperature}'

Importing this module registers the loss modes (see :mod:`.losses`), so an unregistered
``loss_mode`` cannot happen wherever this config is built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...errors import ConfigError, FingerprintMismatch
from . import losses
from .losses import LOSS_MODES, open_cached_store, temperature_message
from ...vocab.fingerprint import check_fingerprint, tokenizer_fingerprint

try:
    from verl.workers.config import DistillationLossConfig
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("vocabmetric.integrations.verl needs verl: pip install 'vocabmetric[verl]'") from exc

LOG = logging.getLogger(__name__)

__all__ = ["VocabMetricLossConfig", "check_before_training", "tokenizer_fingerprint"]


@dataclass
class VocabMetricLossConfig(DistillationLossConfig):
    """verl's ``DistillationLossConfig`` plus the vocabmetric penalty's settings.

    Parameters
    ----------
    loss_mode : {"vocabmetric_sinkhorn", "vocabmetric_tree", "vocabmetric_sliced"}
        The penalty ``D(π_θ(·|x_<t), π_ref(·|x_<t))`` per response token.
    metric_store : str
        Path of the store built for the actor's tokenizer (``vocabmetric build``).
    penalty_metric : str, optional
        Sinkhorn's ground cost (default ``"knn"``).
    penalty_kwargs : dict
        Keyword arguments of the penalty, e.g. ``{"eps": 0.05, "support": 64}``.
    tokenizer_path : str, optional
        The actor's model or tokenizer directory: its ``tokenizer.json`` fingerprint must
        be the store's, and its ``config.json`` ``vocab_size`` (the LM head) must cover the
        store's vocabulary. Not checked when None.
    rollout_temperature : float, optional
        The actor's rollout temperature; it must be 1 (verl divides the policy logits by
        it before the loss). Checked again on every call from the batch's ``temperature``.

    Everything else is verl's (``topk``, ``distillation_loss_coef`` = β,
    ``use_task_rewards``, ``use_policy_gradient``, ``loss_max_clamp``, ...).
    """

    metric_store: Optional[str] = None
    penalty_metric: Optional[str] = None
    penalty_kwargs: dict = field(default_factory=dict)
    tokenizer_path: Optional[str] = None
    rollout_temperature: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        if self.loss_mode in LOSS_MODES:
            check_before_training(self)


def check_before_training(config: Any) -> None:
    """Every check that can fail before step one, each a clear error.

    A missing store path (:class:`ConfigError`), a temperature other than 1, ``topk``
    outside ``[1, V)``, penalty settings the penalty refuses (the penalty is built once
    here), the tokenizer's fingerprint against the store's and the LM head's width against
    the store's V (:class:`FingerprintMismatch`; a head padded past the tokenizer is cut,
    with a log line).
    """
    where = f"distillation.distillation_loss (loss_mode={config.loss_mode})"
    if not config.metric_store:
        raise ConfigError(f"{where}: set +distillation.distillation_loss.metric_store to the path of a store "
                          "built by `vocabmetric build` for the actor's tokenizer")
    if not Path(config.metric_store).exists():
        raise ConfigError(f"{where}: metric_store {config.metric_store!r} does not exist; build it with "
                          "`vocabmetric build` (see docs/verl.md) or fix the path")
    if config.rollout_temperature is not None and float(config.rollout_temperature) != 1.0:
        raise ConfigError(temperature_message(where, config.rollout_temperature))
    if config.use_policy_gradient:
        LOG.warning("%s: use_policy_gradient=True uses the penalty only as a per-token reward; set it to False "
                    "to backpropagate β·D through the policy logits", where)
    store = open_cached_store(config.metric_store)
    V = int(store.vocab_size)
    if config.topk is None or not 1 <= int(config.topk) < V:
        raise ConfigError(f"{where}: topk must be an int in [1, {V}) (the store's vocabulary), got {config.topk!r}")
    try:
        json.dumps(dict(config.penalty_kwargs), sort_keys=True)
    except TypeError as exc:
        raise ConfigError(f"{where}: penalty_kwargs must be plain values, got {config.penalty_kwargs!r}") from exc
    losses.penalty_for(config)  # unknown penalty keywords fail here, not at step 1
    if config.tokenizer_path:
        check_tokenizer(config.tokenizer_path, store, where)


def check_tokenizer(tokenizer_dir: str, store: Any, where: str) -> None:
    """The store's fingerprint against the actor's tokenizer, its V against the LM head."""
    got = tokenizer_fingerprint(tokenizer_dir)
    if got is None:
        LOG.warning("%s: %s has no tokenizer.json; the store's tokenizer is not checked", where, tokenizer_dir)
    else:
        check_fingerprint(store.fingerprint, got, where, source=f"{tokenizer_dir}/tokenizer.json",
                          fix=f"build the store {store.path} from this model's tokenizer "
                              "([tokenizer] spec = \"hf:<model dir>/tokenizer.json\")")
    model_config = Path(tokenizer_dir) / "config.json"
    if not model_config.is_file():
        return
    text = json.loads(model_config.read_text())
    head = text.get("vocab_size", text.get("text_config", {}).get("vocab_size"))
    V = int(store.vocab_size)
    if head is None or int(head) == V:
        return
    if int(head) > V:
        LOG.info("vocabmetric: the LM head of %s has %d outputs and the store %d token ids; the penalty uses "
                 "the first %d logits (the rest are padding)", tokenizer_dir, head, V, V)
        return
    raise FingerprintMismatch(f"{where}: the LM head of {tokenizer_dir} has {head} outputs but the store covers "
                              f"{V} token ids; build the store with this model's tokenizer")
