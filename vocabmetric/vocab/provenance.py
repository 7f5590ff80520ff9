"""How each token got its vector: the provenance codes every job reads.

The build writes them (``tokens/provenance`` in the store), the store, the report, the
service and the explorer read them. Codes, by index into :data:`PROVENANCE`:

- ``none``     — no vector a metric may use: every cost to it is the cap;
- ``trained``  — learned from the corpus, or imported from a model;
- ``borrowed`` — a trained token's vector with the same normalized text (``untrained = "borrow"``);
- ``composed`` — built from the token's parts (``untrained = "compose"``).
"""

from __future__ import annotations

import numpy as np

PROVENANCE = ("none", "trained", "borrowed", "composed")
NONE, TRAINED, BORROWED, COMPOSED = range(len(PROVENANCE))
#: One letter per code, as the terminal tables print it.
PROVENANCE_MARK = {"trained": "t", "borrowed": "b", "composed": "c", "none": "-"}


def provenance_codes(trained: np.ndarray, borrowed_from: np.ndarray, composed: np.ndarray | None = None) -> np.ndarray:
    """(V,) uint8 codes into :data:`PROVENANCE` from the masks: trained wins over borrowed
    (``borrowed_from >= 0``) over composed; the rest is none. O(V)."""
    codes = np.full(len(trained), NONE, np.uint8)
    if composed is not None:
        codes[np.asarray(composed, bool)] = COMPOSED
    codes[np.asarray(borrowed_from) >= 0] = BORROWED
    codes[np.asarray(trained, bool)] = TRAINED
    return codes
