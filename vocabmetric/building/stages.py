"""The stage machinery of the build pipeline: stage keys, content digests, the cache,
atomic stage directories, and the removal of what dead runs left.

A stage is cached under ``OUT/cache/<stage>-<key>/`` where ``key`` (:func:`stage_key`)
hashes the stage's name, parameters, the *content digests* of what it reads and
:data:`CACHE_REVISION`. When a stage finishes, :meth:`Stages.run` hashes the files its
consumers read (:func:`content_digest`, sha256, O(bytes written)) into its ``DONE`` marker;
a downstream key takes that digest, not the upstream key, so a rerun upstream stage whose
output differs (word2vec on several threads) never lets a downstream stage reuse what it
built from the old output.

A stage writes into ``.<stage>-<key>.tmp-<pid>/`` and renames it into place with ``DONE``,
so a killed run never leaves a cache entry that looks finished. A stage that raises
removes its temporary directory; :meth:`Stages.remove_leftovers` removes what dead
processes left (``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>`` in ``OUT`` and
``OUT/cache``, the store's temporary copy among them), and keeps those of live ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

#: Bump when a stage's code changes what it produces, so old cache entries are not reused.
#: 3: keys take the content digests of their inputs; ``DONE`` holds ``{"key", "digest"}``.
CACHE_REVISION = 3
#: A temporary (``tmp``) or replaced (``old``) entry of process ``pid``: ``.<name>.tmp-<pid>``.
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-(?P<pid>[0-9]+)$")


def stage_key(name: str, params: Any, *inputs: str) -> str:
    """A short hash of a stage's name, parameters, input digests and the cache revision."""
    blob = json.dumps({"stage": name, "params": params, "inputs": inputs, "revision": CACHE_REVISION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_digest(directory: Path, names: Sequence[str] | None = None) -> str:
    """sha256 (64 hex digits) over the names and bytes of ``names`` in ``directory``
    (default: every file below it but ``DONE``, in sorted order). Cost: one read of them."""
    if names is None:
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                       if p.is_file() and p.name != "DONE")
    else:
        files = sorted(names)
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{(directory / name).stat().st_size}\0".encode())
        with open(directory / name, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


@dataclass
class StageResult:
    """What one stage did: its cache entry, whether it came from the cache, how long it took,
    and the content digest of its output (``""`` for the store)."""

    name: str
    key: str
    path: Path
    cached: bool
    seconds: float
    digest: str = ""


@dataclass
class Stages:
    """Runs stages into ``OUT/cache``; records what ran and what came from the cache."""

    out: Path
    force: bool = False
    results: list[StageResult] = field(default_factory=list)

    def run(self, name: str, key: str, work: Callable[[Path], None], *, content: Sequence[str] | None = None) -> Path:
        """The cache entry of stage ``name`` under ``key``: reused when finished, else made by
        ``work(tmp)``. ``content``: the output files consumers read, hashed into the digest
        (default: all; leave out what varies run to run, such as timings)."""
        final = self.out / "cache" / f"{name}-{key}"
        done = _read_done(final)
        if done is not None and not self.force:
            self.results.append(StageResult(name, key, final, True, 0.0, done["digest"]))
            LOG.info("stage %s: cached (%s)", name, final)
            return final
        remove_leftovers(final.parent, f".{final.name}.")
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        try:
            work(tmp)
            digest = content_digest(tmp, content)
            (tmp / "DONE").write_text(json.dumps({"key": key, "digest": digest}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a failed (or interrupted) stage leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        self.results.append(StageResult(name, key, final, False, seconds, digest))
        return final

    def digest(self, name: str) -> str:
        """The content digest of the latest run of stage ``name``, for the keys of its consumers."""
        for result in reversed(self.results):
            if result.name == name:
                return result.digest
        raise KeyError(f"stage {name!r} has not run")

    def remove_leftovers(self) -> None:
        """Remove what dead processes left in ``OUT`` and ``OUT/cache`` (stage directories and
        the store's ``.metric.zarr.tmp-<pid>``); a live process's (a concurrent build) stays."""
        remove_leftovers(self.out)
        remove_leftovers(self.out / "cache")


def _read_done(final: Path) -> dict | None:
    """The ``{"key", "digest"}`` of a finished cache entry, or None (absent, unfinished, or
    of an older revision)."""
    try:
        done = json.loads((final / "DONE").read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and isinstance(done.get("digest"), str) else None


def remove_leftovers(directory: Path, prefix: str = ".") -> None:
    """Remove ``directory``'s ``<prefix>….tmp-<pid>`` / ``.old-<pid>`` entries of processes that
    are gone."""
    if not directory.is_dir():
        return
    for stale in directory.iterdir():
        found = LEFTOVER.match(stale.name)
        if found and stale.name.startswith(prefix) and not process_alive(int(found["pid"])):
            LOG.info("removing %s, left by an interrupted run", stale)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended). Atomic as part of a stage's
    temporary directory, which is renamed into place only when the stage is done."""
    with open(path, "wb") as fh:
        np.save(fh, array)
