"""verl's plugin hook: ``import verl`` imports this module in every process (the
``verl.plugins`` entry point in pyproject.toml), which registers the vocabmetric loss modes.
verl swallows a plugin's import error (it logs it at DEBUG), so :mod:`.config` registers
them again wherever the loss config is built."""

from __future__ import annotations

import logging

from .losses import register

LOG = logging.getLogger(__name__)

register()
