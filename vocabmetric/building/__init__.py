"""Job 1, building a metric: a validated TOML config run as cached, resumable stages.

tokenizer (:mod:`vocabmetric.vocab`) → corpus (:mod:`.corpus`: one reader per format, then
token-id shards) → embeddings (:mod:`.embeddings`: word2vec, or a model's own matrix from
:mod:`.checkpoint`; untrained tokens by policy, :mod:`.compose`) → metrics
(:mod:`.metrics_stage` over :mod:`vocabmetric.metrics`) → the store (:mod:`vocabmetric.store`).
The stage machinery (keys, cache, atomic directories) is :mod:`.stages`; the config and the
runner are :mod:`.pipeline`. The public entry points are ``vocabmetric.build`` and
``vocabmetric.load_config``.
"""

from .._util.gguf import resolve_source as resolve_source  # a config path, ``pkg:<package>/<file>`` included
