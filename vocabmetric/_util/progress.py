"""The one progress rule: show a bar when told to, else only when stderr is a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

LOG = logging.getLogger(__name__)


def show_progress(progress: bool | None) -> bool:
    """``progress`` when given; ``None`` means: only when stderr is a TTY (not in logs or CI)."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def progress_bar(iterable: Any, progress: bool | None, **kwds: Any) -> Any:
    """tqdm over ``iterable`` (None: a manual bar, ``.update(n)``), shown by :func:`show_progress`.

    The bar is cleared when done unless ``leave=True`` is passed; other keywords go to tqdm.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show_progress(progress), **{"leave": False, **kwds})
