"""The vocabmetric penalty as verl loss modes (``vocabmetric_tree``, ``_sinkhorn``,
``_sliced``); see docs/verl.md. Importing it registers the modes with verl."""

from .config import VocabMetricLossConfig as VocabMetricLossConfig
from .config import check_before_training as check_before_training
from .losses import LOSS_MODES as LOSS_MODES
from .losses import penalty_for as penalty_for
from .losses import register as register

__all__ = ["LOSS_MODES", "VocabMetricLossConfig", "check_before_training", "penalty_for", "register"]
