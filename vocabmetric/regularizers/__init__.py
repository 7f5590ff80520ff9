"""Regularizers for RL fine-tuning (torch): KL estimators and Wasserstein penalties.

Every regularizer takes policy logits ``[..., V]`` (with grad) and a reference, and
returns per-position values ``[...]``; the caller chooses the mask and the reduction.
"""
from .kl import aggregate as aggregate, full_kl as full_kl, kl_estimate as kl_estimate, kl_in_reward as kl_in_reward
from .factory import PENALTIES as PENALTIES, FullKL as FullKL, regularizer_from_store as regularizer_from_store
from .sinkhorn import SinkhornDivergence as SinkhornDivergence
from .sliced import SlicedWasserstein as SlicedWasserstein
from .tree import TreeWasserstein as TreeWasserstein
