"""Peak memory of importing one embedding matrix from a multi-GB bf16 safetensors shard.

Writes one shard (default about 2 GB) the way a 1–2B model's first shard looks: the input
embedding matrix (V × d, bf16) followed by other large tensors (MLP and attention weights),
then, each in a fresh subprocess, reads the embedding matrix as float32:

* ``vocabmetric``: :func:`vocabmetric.building.checkpoint.load_matrix` (the header parsed, only that
  tensor's byte range read, slice by slice);
* ``safetensors.torch.load_file``: every tensor of the shard, then the one converted
  (``.float().numpy()``), which is what the import did before.

Each reports the process's peak RSS (``ru_maxrss``) and its RSS after imports, beside the
matrix's float32 size V·d·4. The shard is deleted afterwards.

    .venv/bin/python benchmarks/checkpoint_import.py [--gb 2] [--vocab 151936] [--dim 1536]
    # writes benchmarks/results/checkpoint_import.{json,md}
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402

EMBEDDING = "model.embed_tokens.weight"


def write_shard(path: Path, vocab: int, dim: int, total_bytes: int) -> dict[str, tuple[int, int]]:
    """A bf16 safetensors file: the embedding matrix, then filler tensors up to ``total_bytes``.

    Written in chunks (the whole shard is never in memory); the embedding rows are random
    normals rounded down to bf16, the fillers a constant.
    """
    shapes = {EMBEDDING: (vocab, dim)}
    filler_rows = 4 * dim
    remaining = total_bytes - vocab * dim * 2
    k = 0
    while remaining > 0:
        rows = min(filler_rows, max(1, remaining // (dim * 2)))
        shapes[f"model.layers.{k}.mlp.up_proj.weight"] = (rows, dim)
        remaining -= rows * dim * 2
        k += 1
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for lo in range(0, vocab, 8192):
            rows = rng.standard_normal((min(8192, vocab - lo), dim), dtype=np.float32) * 0.02
            fh.write((rows.view(np.uint32) >> 16).astype("<u2").tobytes())
        chunk = np.full(filler_rows * dim, 0x3C00, dtype="<u2").tobytes()
        for name, shape in list(shapes.items())[1:]:
            fh.write(chunk[: shape[0] * shape[1] * 2])
    return shapes


_CHILD = r"""
import json, resource, sys, time
import numpy as np

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

method, path, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
if method == "vocabmetric":
    from vocabmetric.building.checkpoint import load_matrix
else:
    import torch
    from safetensors.torch import load_file
base = rss_mb()
start = time.perf_counter()
if method == "vocabmetric":
    vectors = load_matrix(path, vocab).vectors
else:
    vectors = load_file(path)["model.embed_tokens.weight"][:vocab].float().numpy()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"method": method, "seconds": seconds, "rss_after_imports_mb": base, "peak_rss_mb": peak,
                  "checksum": float(np.abs(vectors[::97]).sum(dtype=np.float64)), "shape": list(vectors.shape)}))
"""


def measure(method: str, path: Path, vocab: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, method, str(path), str(vocab)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="shard size in GB")
    parser.add_argument("--vocab", type=int, default=151936, help="embedding rows (Qwen2's padded vocabulary)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the shard (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model-00001-of-00002.safetensors"
        start = time.perf_counter()
        shapes = write_shard(path, args.vocab, args.dim, int(args.gb * 1e9))
        write_seconds = time.perf_counter() - start
        shard_bytes = path.stat().st_size
        runs = [measure(m, path, args.vocab) for m in ("vocabmetric", "safetensors.torch.load_file")]
    assert runs[0]["checksum"] == runs[1]["checksum"], "the two reads disagree"
    f32_mb = args.vocab * args.dim * 4 / 2**20
    for r in runs:
        r["extra_rss_mb"] = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        r["extra_over_f32"] = r["extra_rss_mb"] / f32_mb
    payload = {"shard_bytes": shard_bytes, "n_tensors": len(shapes), "vocab": args.vocab, "dim": args.dim,
               "matrix_f32_mb": f32_mb, "write_seconds": write_seconds, "runs": runs,
               "command": " ".join(["benchmarks/checkpoint_import.py", *sys.argv[1:]]), "machine": machine_info()}
    rows = "\n".join(
        f"| {r['method']} | {r['seconds']:.2f} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
        f"{r['extra_rss_mb']:.0f} | {r['extra_over_f32']:.2f} |" for r in runs)
    table = (
        f"Importing the {args.vocab} × {args.dim} bf16 embedding matrix (float32: {f32_mb:.0f} MB) from one "
        f"{shard_bytes / 1e9:.2f} GB safetensors shard of {len(shapes)} tensors; each method in a fresh process. "
        f"Extra = peak RSS − RSS after imports. Command: `.venv/bin/python {payload['command']}`.\n\n"
        "| method | seconds | RSS after imports (MB) | peak RSS (MB) | extra (MB) | extra / float32 size |\n"
        "|---|---|---|---|---|---|\n" + rows + "\n"
    )
    write_results("checkpoint_import", payload, table)
    print(table)


if __name__ == "__main__":
    main()
