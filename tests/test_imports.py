"""What an import pulls in: a training job imports the regularizers without the build side."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BUILD_SIDE = ("pydantic", "zarr", "gensim", "faiss", "tokenizers", "umap")


def modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_the_regularizers_import_without_the_build_side():
    loaded = modules_after("import vocabmetric.regularizers")
    top = {name.split(".")[0] for name in loaded}
    assert "torch" in top
    assert not top & set(BUILD_SIDE), sorted(top & set(BUILD_SIDE))
    assert not {"vocabmetric.building.pipeline", "vocabmetric.store", "vocabmetric.vocab.tokenizer"} & loaded


def test_the_build_side_names_resolve_on_first_use():
    import vocabmetric

    loaded = modules_after("import vocabmetric; vocabmetric.open_store")
    assert "vocabmetric.store" in loaded and "vocabmetric.building.pipeline" not in loaded
    for name in ("build", "load_config", "MetricStore", "Neighbor", "open_store", "Tokenizer", "load_tokenizer"):
        assert name in dir(vocabmetric) and callable(getattr(vocabmetric, name)), name
    from vocabmetric import MetricStore, open_store  # noqa: F401  (the usual spelling works)

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        vocabmetric.nonexistent  # noqa: B018
