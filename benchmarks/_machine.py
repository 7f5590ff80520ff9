"""Machine info recorded beside every benchmark result, and a results writer."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, memory, library versions and (when used) the GPU."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    for mod in ("numpy", "torch", "faiss", "gensim", "zarr", "ot"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed: nothing to record
            pass
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(name: str, payload: dict, table_md: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (payload + machine) and ``<name>.md`` (the table) atomically,
    into ``out_dir``, else ``$BENCH_RESULTS`` (a dry run's scratch folder), else results/."""
    out_dir = Path(out_dir or os.environ.get("BENCH_RESULTS") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2, default=str)), (".md", table_md)):
        path = out_dir / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out_dir / f"{name}.json"
