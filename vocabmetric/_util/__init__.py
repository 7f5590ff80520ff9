"""Numerical and process helpers every job shares (private to vocabmetric): the l2 distance
and normalization (:mod:`.vectors`), the compile-once numba helper (:mod:`.jit`), the
progress rule (:mod:`.progress`)."""
