"""Nothing corrupt is ever served: every way of damaging a store copy is caught by name."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vocabmetric import StoreError, open_store
from vocabmetric.store.integrity import MANIFEST, Manifest, write_manifest


def serve_everything(path: Path) -> None:
    """Everything a user, the service or a trainer reads from a store."""
    store = open_store(path)
    store.counts, store.trained, store.borrowed_from, store.embeddings(normalized=True)
    store.token_bytes_list
    for metric in store.metrics:
        if metric == "tree":
            store.tree()
        elif metric != "l2":
            store.operator(metric)
        store.neighbors(1, k=3, metric=metric)
    store.faiss_index()
    if (Path(path) / "projection2d").is_dir():
        store.projection2d()


@pytest.fixture()
def store_copy(small_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store.path, copy)
    return copy


def files_of(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_an_intact_copy_serves_and_verifies(store_copy):
    serve_everything(store_copy)
    manifest = Manifest.load(store_copy)
    assert manifest is not None and manifest.verify() == len(files_of(store_copy)) - 1  # all but itself
    assert {"embeddings", "tokens/bytes", "tokens/offsets"} <= set(manifest.arrays)


def test_every_single_chunk_deletion_is_refused(store_copy):
    chunks = [rel for rel in files_of(store_copy) if "/c/" in rel]
    arrays = {rel.split("/c/")[0] for rel in chunks}
    assert len(arrays) >= 8, arrays  # tokens/*, embeddings, each metric's arrays, the tree
    for rel in chunks:
        path = store_copy / rel
        kept = path.read_bytes()
        path.unlink()
        try:
            with pytest.raises(StoreError, match=rf"array {rel.split('/c/')[0]}, file {rel} is missing.*rebuild"):
                serve_everything(store_copy)
        finally:
            path.write_bytes(kept)
    serve_everything(store_copy)


@pytest.mark.parametrize("rel", ["zarr.json", "tokens/bytes/c/0", "metrics/knn/costs/c/0/0", "index.faiss", MANIFEST])
def test_a_truncated_file_is_refused(store_copy, rel):
    path = store_copy / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupt"):
        serve_everything(store_copy)


def test_a_hundred_random_bit_flips_are_all_refused(store_copy):
    rng = np.random.default_rng(0)
    names = files_of(store_copy)
    sizes = np.array([(store_copy / rel).stat().st_size for rel in names], dtype=float)
    for _ in range(100):
        rel = names[rng.choice(len(names), p=np.sqrt(sizes) / np.sqrt(sizes).sum())]  # small files too
        path = store_copy / rel
        data = bytearray(path.read_bytes())
        at = int(rng.integers(len(data)))
        data[at] ^= 1 << int(rng.integers(8))
        kept = path.read_bytes()
        path.write_bytes(bytes(data))
        try:
            with pytest.raises(StoreError):
                serve_everything(store_copy)
        finally:
            path.write_bytes(kept)


def rewrite_root_attrs(root: Path, **changes) -> None:
    meta_path = root / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        node = meta["attributes"]
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    meta_path.write_text(json.dumps(meta))


def test_an_edited_attribute_breaks_the_hash(store_copy, small_store):
    rewrite_root_attrs(store_copy, tokenizer__vocab_size=small_store.vocab_size + 5)
    with pytest.raises(StoreError, match="file zarr.json (does not match its hash|has [0-9]+ bytes where).*corrupt"):
        open_store(store_copy)


def test_a_wrong_vocab_size_is_named_even_with_a_fresh_manifest(store_copy, small_store):
    rewrite_root_attrs(store_copy, tokenizer__vocab_size=small_store.vocab_size + 5)
    write_manifest(store_copy)  # a consistent store that lies about its vocabulary
    with pytest.raises(StoreError, match=rf"vocab_size {small_store.vocab_size + 5} but array (tokens/offsets|embeddings) has {small_store.vocab_size} rows"):
        open_store(store_copy)


def test_a_string_schema_version_is_named_as_such(store_copy):
    rewrite_root_attrs(store_copy, schema_version="1")
    write_manifest(store_copy)
    with pytest.raises(StoreError, match=r"schema version '1' \(a str\)"):
        open_store(store_copy)


def test_a_store_without_a_manifest_opens_unverified_with_a_warning(store_copy, caplog):
    os.remove(store_copy / MANIFEST)
    with caplog.at_level(logging.WARNING, logger="vocabmetric"):
        serve_everything(store_copy)
    assert "unverified" in caplog.text


def test_a_truncated_root_metadata_of_an_old_store_is_a_store_error(store_copy):
    os.remove(store_copy / MANIFEST)
    path = store_copy / "zarr.json"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StoreError, match="zarr.json"):
        open_store(store_copy)


def test_a_truncated_chunk_of_an_old_store_is_a_store_error(store_copy):
    os.remove(store_copy / MANIFEST)
    path = store_copy / "embeddings" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StoreError, match="embeddings"):
        open_store(store_copy).embeddings()


def test_verify_checks_every_hash(store_copy):
    manifest = Manifest.load(store_copy)
    target = next(rel for rel in manifest.files if rel.startswith("embeddings/c/"))
    data = bytearray((store_copy / target).read_bytes())
    data[-1] ^= 0x10
    (store_copy / target).write_bytes(bytes(data))
    manifest.check_presence()  # sizes are unchanged: the cheap check passes
    with pytest.raises(StoreError, match=f"array embeddings, file {target} does not match its hash"):
        manifest.verify()
