"""A store that proves itself: the manifest of every file, checked before anything is served.

A store directory holds zarr arrays (one metadata file and one file per chunk each), group
metadata and the faiss index. The build writes ``manifest.json`` last, atomically (a
temporary file renamed into place), before the store directory itself is renamed into
place::

    {"format": "vocabmetric.manifest/1",
     "arrays": {"metrics/knn/costs": {"shape": [V, k], "chunks": 25}, ...},
     "files":  {"metrics/knn/costs/c/1/0": [size, blake2b-128 hex], ...}}

Three levels of checking, each a :class:`~vocabmetric.errors.StoreError` that names the
array, the file and the command that rebuilds the store:

* :meth:`Manifest.check_presence` and :meth:`Manifest.verify_metadata` — on open, O(files)
  ``stat`` calls: every listed file is there with its size, every array has all its chunks,
  and the metadata files (a few KB) match their hashes.
* :meth:`Manifest.verify_array` — before an array is first read: its files' hashes
  (O(compressed bytes) of that array; the store reads whole arrays, so each byte served
  was hashed once).
* :meth:`Manifest.verify` — every file (``vocabmetric verify STORE``).

Stores written before manifests open with a warning that they are unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import StoreError

LOG = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vocabmetric.manifest/1"
REBUILD = "rebuild it with `vocabmetric build CONFIG --out DIR` (finished stages come from the cache)"


def file_digest(path: Path) -> str:
    """The blake2b-128 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _array_meta(meta_path: Path) -> dict | None:
    """The metadata of the zarr array at ``meta_path`` (a ``zarr.json``), or None for a group."""
    meta = json.loads(meta_path.read_text())
    return meta if meta.get("node_type") == "array" else None


def expected_chunks(meta: dict) -> int:
    """Chunks of a regular grid: ∏ ⌈shape_i / chunk_i⌉ (1 for a 0-d array)."""
    shape = meta["shape"]
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return math.prod(math.ceil(s / c) if s else 0 for s, c in zip(shape, chunk)) if shape else 1


def chunk_count(files: Iterable[str], key: str) -> int:
    """How many of ``files`` (store-relative paths) are chunks of array ``key``."""
    return sum(1 for rel in files if rel.startswith(f"{key}/c/"))


def write_manifest(root: Path) -> dict:
    """Hash every file under ``root`` and write ``root/manifest.json`` atomically.

    Call it when every array, attribute and index is written. Raises :class:`StoreError`
    if an array lacks chunks (an array written without ``write_empty_chunks``).
    """
    root = Path(root)
    files: dict[str, list] = {}
    arrays: dict[str, dict] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = _relative(root, path)
            if rel == MANIFEST or name.startswith(".") or name.endswith(".tmp"):
                continue
            files[rel] = [path.stat().st_size, file_digest(path)]
            if name == "zarr.json" and (meta := _array_meta(path)) is not None:
                key = _relative(root, path.parent)
                arrays[key] = {"shape": meta["shape"], "chunks": expected_chunks(meta)}
    manifest = {"format": FORMAT, "arrays": arrays, "files": dict(sorted(files.items()))}
    for key, info in arrays.items():
        have = chunk_count(files, key)
        if have != info["chunks"]:
            raise StoreError(f"{root}: array {key} has {have} of its {info['chunks']} chunk files; "
                             "write it with write_empty_chunks=True")
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, root / MANIFEST)
    return manifest


@dataclass
class Manifest:
    """The manifest of the store at ``root`` (see the module docstring)."""

    root: Path
    arrays: dict
    files: dict

    @classmethod
    def load(cls, root: Path) -> "Manifest | None":
        """The store's manifest; None for a store written before manifests (warned once)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            LOG.warning("%s has no manifest (written before vocabmetric verified its stores): its contents "
                        "are unverified; %s", root, REBUILD)
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            manifest = cls(root, dict(data["arrays"]), {k: (int(v[0]), str(v[1])) for k, v in data["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise StoreError(f"{path} is unreadable ({exc}); the store is corrupt: {REBUILD}") from None
        return manifest

    def _fail(self, key: str, rel: str, what: str) -> StoreError:
        where = f"array {key}, file {rel}" if key else f"file {rel}"
        return StoreError(f"{self.root}: {where} {what}; the store is corrupt: {REBUILD}")

    def array_of(self, rel: str) -> str:
        """The array a file belongs to ('' for group metadata and the index)."""
        if "/c/" in rel:
            parent = rel.rsplit("/c/", 1)[0]
        elif rel.endswith("/zarr.json"):
            parent = rel.rsplit("/", 1)[0]
        else:
            return ""
        return parent if parent in self.arrays else ""

    def _files(self, prefix: str | None) -> Iterable[tuple[str, tuple[int, str]]]:
        for rel, entry in self.files.items():
            if prefix is None or rel == f"{prefix}/zarr.json" or rel.startswith(f"{prefix}/c/"):
                yield rel, entry

    def check_presence(self) -> None:
        """Every listed file exists with its listed size; every array lists all its chunks."""
        for key, info in self.arrays.items():
            have = chunk_count(self.files, key)
            if have != info["chunks"]:
                raise self._fail(key, f"{key}/c/…", f"lists {have} of {info['chunks']} chunks")
        for rel, (size, _) in self.files.items():
            try:
                actual = (self.root / rel).stat().st_size
            except FileNotFoundError:
                raise self._fail(self.array_of(rel), rel, "is missing") from None
            if actual != size:
                raise self._fail(self.array_of(rel), rel, f"has {actual} bytes where the manifest says {size}")

    def verify_metadata(self) -> None:
        """Hash every ``zarr.json`` (group and array metadata, the root's attributes): small
        files that zarr parses on open."""
        for rel in self.files:
            if rel.endswith("zarr.json"):
                self.verify_file(rel)

    def verify_file(self, rel: str) -> None:
        size, digest = self.files[rel]
        path = self.root / rel
        try:
            actual_size = path.stat().st_size
            actual = file_digest(path)
        except FileNotFoundError:
            raise self._fail(self.array_of(rel), rel, "is missing") from None
        if actual_size != size or actual != digest:
            raise self._fail(self.array_of(rel), rel, "does not match its hash in the manifest")

    def verify_array(self, key: str) -> None:
        """Hash every file of array ``key`` (its metadata and chunks) against the manifest."""
        if key not in self.arrays:
            raise StoreError(f"{self.root}: the manifest lists no array {key}; the store is corrupt: {REBUILD}")
        for rel, _ in self._files(key):
            self.verify_file(rel)

    def verify(self) -> int:
        """Hash every file; returns how many were checked."""
        self.check_presence()
        for rel in self.files:
            self.verify_file(rel)
        return len(self.files)


# -- reading through the manifest ------------------------------------------------------------
#: What zarr, numcodecs and json raise on damaged bytes (a truncated chunk, bad JSON, ...).
_READ_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError, IndexError)


def open_group(root: Path, manifest: "Manifest | None"):
    """The store's zarr group, read-only, after the manifest's cheap checks (presence,
    sizes, metadata hashes); damaged metadata of an unverified store is a StoreError too."""
    import zarr

    if manifest is not None:
        manifest.check_presence()
        manifest.verify_metadata()
    try:
        group = zarr.open_group(str(root), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except _READ_ERRORS as exc:
        raise StoreError(f"{root}: its metadata (zarr.json) is unreadable ({type(exc).__name__}: {exc}); "
                         f"the store is corrupt: {REBUILD}") from None
    return group, attrs


def read_array(group, key: str, manifest: "Manifest | None"):
    """Array ``key`` of the store, whole, after its files were checked against the manifest."""
    if manifest is not None:
        manifest.verify_array(key)
    try:
        return group[key][...]
    except _READ_ERRORS as exc:
        raise StoreError(f"{manifest.root if manifest else ''}: array {key} is unreadable "
                         f"({type(exc).__name__}: {exc}); the store is corrupt: {REBUILD}") from None
