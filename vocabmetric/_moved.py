"""Module paths that moved when the package was laid out by job (0.2): the old path still
imports, for one release, as the new module, with a :class:`DeprecationWarning` naming it.

``import vocabmetric.pipeline`` gives ``vocabmetric.building.pipeline`` itself (the same module
object, so monkeypatching either patches both). The table below is the one list of what
moved; the README's "Changed" repeats it for users.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path → new module path
MOVED = {
    "vocabmetric.tokenizers": "vocabmetric.vocab.tokenizer",
    "vocabmetric.pipeline": "vocabmetric.building.pipeline",
    "vocabmetric.stages": "vocabmetric.building.stages",
    "vocabmetric.metrics_stage": "vocabmetric.building.metrics_stage",
    "vocabmetric.corpus": "vocabmetric.building.corpus",
    "vocabmetric.checkpoint": "vocabmetric.building.checkpoint",
    "vocabmetric.embeddings": "vocabmetric.building.embeddings",
    "vocabmetric.compose": "vocabmetric.building.compose",
    "vocabmetric.operator": "vocabmetric.cost",
    "vocabmetric.integrity": "vocabmetric.store.integrity",
    "vocabmetric.report": "vocabmetric.query.report",
    "vocabmetric.eval": "vocabmetric.query.evaluation",
    "vocabmetric.plots": "vocabmetric.query.plots",
    "vocabmetric.service": "vocabmetric.query.service",
    "vocabmetric.service.client": "vocabmetric.query.service.client",
    "vocabmetric.service.projection": "vocabmetric.query.service.projection",
}


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved path and loads it as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._spec = module.__spec__  # the import system sets the alias spec on it: put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once: a moved submodule (``vocabmetric.service.client``)
    would otherwise be found again, under its old name, through its moved parent's ``__path__``."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
