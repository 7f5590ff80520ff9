"""Writing a store: every array, the faiss index, the attributes and the manifest, into a
temporary directory renamed into place (see :mod:`._schema` for the layout)."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._util import vectors as _vectors
from .._version import __version__
from ..vocab.provenance import COMPOSED
from ..errors import StoreError
from .integrity import write_manifest
from ._schema import SCHEMA_VERSION, TREE, TreeArrays, TruncatedMetric, provenance_counts


def write_store(
    path: Path,
    *,
    tokenizer: Any,
    token_bytes: list[bytes],
    counts: np.ndarray,
    embeddings: Any,
    corpus: Mapping[str, Any],
    metrics: Mapping[str, TruncatedMetric] = {},
    tree: TreeArrays | None = None,
    extra_arrays: Mapping[str, np.ndarray] = {},
) -> Path:
    """Write a complete store at ``path`` atomically (temporary directory, then rename).

    ``embeddings`` is an :class:`vocabmetric.building.embeddings.Embeddings`. An existing store at
    ``path`` is replaced only once the new one is complete.
    """
    import zarr

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vocab_size = len(token_bytes)
    vectors = embeddings.vectors
    if vectors.shape[0] != vocab_size or len(counts) != vocab_size:
        raise StoreError(
            f"write_store: embeddings {vectors.shape}, counts {counts.shape} and the tokenizer's "
            f"{vocab_size} ids disagree"
        )
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    rows = 4096
    put = _array_writer()
    tokens = root.require_group("tokens")
    lengths = np.fromiter((len(b) for b in token_bytes), dtype=np.int64, count=vocab_size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.frombuffer(b"".join(token_bytes), dtype=np.uint8)
    put(tokens, "bytes", data=flat if flat.size else np.zeros(0, np.uint8), chunks=(1 << 20,))
    put(tokens, "offsets", data=offsets, chunks=(1 << 18,))
    put(tokens, "count", data=np.asarray(counts, np.int64), chunks=(1 << 18,))
    put(tokens, "trained", data=np.asarray(embeddings.trained, bool), chunks=(1 << 18,))
    put(tokens, "borrowed_from", data=np.asarray(embeddings.borrowed_from, np.int32), chunks=(1 << 18,))
    provenance = np.asarray(embeddings.provenance, np.uint8)
    put(tokens, "provenance", data=provenance, chunks=(1 << 18,))
    put(root, "embeddings", data=np.asarray(vectors, np.float32), chunks=(rows, vectors.shape[1]))
    for name, arr in extra_arrays.items():
        put(root, name, data=arr, chunks=(rows,) + arr.shape[1:])
    if metrics or tree is not None:
        group = root.require_group("metrics")
        for name, m in metrics.items():
            g = group.require_group(name)
            put(g, "indices", data=np.asarray(m.indices, np.int32), chunks=(rows, m.indices.shape[1]))
            put(g, "costs", data=np.asarray(m.costs, np.float32), chunks=(rows, m.costs.shape[1]))
            g.attrs.update(_jsonable({**m.attrs, "cap": float(m.cap), "k": int(m.indices.shape[1])}))
        if tree is not None:
            g = group.require_group(TREE)
            stacked = tree.offsets is not None and len(tree.offsets) > 2  # T > 1 trees
            for field in ("parent", "weight", "leaf_of_token") + (("offsets",) if stacked else ()):
                data = np.asarray(getattr(tree, field))
                if field == "leaf_of_token" and not stacked:
                    data = data.reshape(-1)  # one tree: (V,), as before several trees could be stored
                put(g, field, data=data, chunks=(1,) * (data.ndim - 1) + (1 << 18,))
            g.attrs.update(_jsonable({**tree.attrs, "kind": TREE}))
    _write_faiss_index(tmp / "index.faiss", vectors, embeddings.usable)
    root.attrs.update(
        _jsonable(
            {
                "schema_version": SCHEMA_VERSION,
                "vocabmetric_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "tokenizer": {"spec": tokenizer.spec, "fingerprint": tokenizer.fingerprint, "vocab_size": vocab_size},
                "corpus": dict(corpus),
                "embeddings": {
                    "method": embeddings.method,
                    "params": embeddings.params,
                    "dim": int(vectors.shape[1]),
                    "n_trained": int(np.sum(embeddings.trained)),
                    "n_borrowed": int(np.sum(embeddings.borrowed_from >= 0)),
                    "n_composed": int(np.sum(provenance == COMPOSED)),
                    "provenance": provenance_counts(provenance),
                },
            }
        )
    )
    root.attrs["complete"] = True  # only a finished store carries it
    write_manifest(tmp)  # last: hashes of everything above
    _replace_dir(tmp, path)
    return path


def _array_writer():
    """``put(group, name, data=, chunks=)``: every chunk written (an all-fill chunk too, so
    that a missing file is always damage) and zstd-compressed with its frame checksum."""
    import zarr

    compressor = zarr.codecs.ZstdCodec(level=0, checksum=True)

    def put(group, name: str, *, data, chunks):
        return group.create_array(name, data=data, chunks=chunks, compressors=compressor,
                                  config={"write_empty_chunks": True})

    return put


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is removed only after the move succeeds."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_faiss_index(path: Path, vectors: np.ndarray, usable: np.ndarray) -> None:
    import faiss

    ids = np.flatnonzero(usable).astype(np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(ids):
        index.add_with_ids(_vectors.normalized(vectors[ids]), ids)
    faiss.write_index(index, str(path))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
