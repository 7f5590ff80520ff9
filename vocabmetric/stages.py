"""The stage machinery of the build pipeline: stage keys, the cache, atomic stage directories.

A stage is cached under ``OUT/cache/<stage>-<key>/`` where ``key`` (:func:`stage_key`)
hashes the stage's name, parameters, the keys of the stages it reads and
:data:`CACHE_REVISION`. :meth:`Stages.run` writes into ``.<stage>-<key>.tmp-<pid>/`` and
renames it into place with a ``DONE`` marker, so a killed run never leaves a cache entry
that looks finished; what killed runs left behind is removed on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

LOG = logging.getLogger(__name__)

#: Bump when a stage's code changes what it produces, so old cache entries are not reused.
CACHE_REVISION = 2


def stage_key(name: str, params: Any, *inputs: str) -> str:
    """A short hash of a stage's name, parameters, input keys and the cache revision."""
    blob = json.dumps({"stage": name, "params": params, "inputs": inputs, "revision": CACHE_REVISION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageResult:
    """What one stage did: its cache entry, whether it came from the cache, how long it took."""

    name: str
    key: str
    path: Path
    cached: bool
    seconds: float


@dataclass
class Stages:
    """Runs stages into ``OUT/cache``; records what ran and what came from the cache."""

    out: Path
    force: bool = False
    results: list[StageResult] = field(default_factory=list)

    def run(self, name: str, key: str, work: Callable[[Path], None]) -> Path:
        final = self.out / "cache" / f"{name}-{key}"
        if final.is_dir() and (final / "DONE").is_file() and not self.force:
            self.results.append(StageResult(name, key, final, True, 0.0))
            LOG.info("stage %s: cached (%s)", name, final)
            return final
        _remove_stale_tmp(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        work(tmp)
        (tmp / "DONE").write_text(key)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        seconds = time.perf_counter() - start
        self.results.append(StageResult(name, key, final, False, seconds))
        return final


def _remove_stale_tmp(final: Path) -> None:
    """Remove what killed runs left of this stage (``.<name>.tmp-<pid>`` of a process that is gone).

    A directory of a process that is still running (a concurrent build) is left alone.
    """
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            LOG.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (no ``.npy`` appended). Atomic as part of a stage's
    temporary directory, which is renamed into place only when the stage is done."""
    with open(path, "wb") as fh:
        np.save(fh, array)
