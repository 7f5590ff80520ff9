"""Regularizers for RL fine-tuning (torch): KL estimators and Wasserstein penalties.

Every penalty takes policy logits ``[..., V]`` (with grad) and a reference, and returns
per-position values ``[...]``; the caller chooses the mask and the reduction. Each keeps
the :class:`Penalty` contract and is listed by name in :data:`PENALTIES`.
:func:`lm_head_penalty` computes any of them from hidden states and the LM head, a chunk of
positions at a time, without the ``(N, V)`` logits.
"""
from ._inputs import Reference as Reference, reference_probs as reference_probs
from ._penalty import Penalty as Penalty
from .exact_kl import FullKL as FullKL, full_kl as full_kl
from .factory import regularizer_from_store as regularizer_from_store
from .kl import kl_estimate as kl_estimate, kl_in_reward as kl_in_reward
from .lm_head import lm_head_penalty as lm_head_penalty
from .reduction import aggregate as aggregate
from .registry import PENALTIES as PENALTIES, PENALTY_CLASSES as PENALTY_CLASSES, penalty_class as penalty_class
from .sinkhorn import SinkhornDivergence as SinkhornDivergence
from .sliced import SlicedWasserstein as SlicedWasserstein
from .tree import TreeWasserstein as TreeWasserstein
