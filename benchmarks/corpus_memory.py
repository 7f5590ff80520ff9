"""Peak memory of tokenizing a corpus larger than 1 GB, streamed from Parquet or zstd JSONL.

Generates the corpus (default 1.1 GB of UTF-8 text: the Lee corpus's documents, each made
unique by a running number), written as Parquet (zstd-compressed, row groups of
``--row-group`` rows) or ``.jsonl.zst``, then tokenizes it with
:func:`vocabmetric.building.corpus.tokenize_corpus` (``tiktoken:cl100k_base``, ``--workers`` processes)
in a fresh subprocess, and reports the peak RSS of that process and of its largest worker
next to the corpus size. Memory should stay at a few batches (``batch_chars``) per worker,
whatever the corpus size. The generated files are deleted afterwards.

    .venv/bin/python benchmarks/corpus_memory.py [--gb 1.1] [--format parquet|jsonl.zst] [--workers 2]
    # writes benchmarks/results/corpus_memory.{json,md}
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
from _machine import machine_info, write_results  # noqa: E402

LEE = ROOT / "data" / "lee_background.txt.gz"


def documents(target_bytes: int):
    """Unique documents (Lee texts with a running number) until ``target_bytes`` of UTF-8."""
    with gzip.open(LEE, "rt", encoding="utf-8") as fh:
        base = [line.strip() for line in fh if line.strip()]
    written, n = 0, 0
    while written < target_bytes:
        text = f"Document {n}. {base[n % len(base)]} {base[(7 * n + 3) % len(base)]}"
        written += len(text.encode())
        n += 1
        yield text


def write_corpus(directory: Path, fmt: str, target_bytes: int, row_group: int) -> tuple[Path, int, int]:
    """The corpus file; returns (path, documents, text bytes)."""
    n_docs = n_bytes = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "corpus.parquet"
        schema = pa.schema([("id", pa.int64()), ("text", pa.large_string())])
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            batch: list[str] = []
            for text in documents(target_bytes):
                batch.append(text)
                if len(batch) == row_group:
                    writer.write_table(pa.table({"id": range(n_docs, n_docs + len(batch)), "text": batch}, schema))
                    n_docs += len(batch)
                    n_bytes += sum(len(t.encode()) for t in batch)
                    batch = []
            if batch:
                writer.write_table(pa.table({"id": range(n_docs, n_docs + len(batch)), "text": batch}, schema))
                n_docs += len(batch)
                n_bytes += sum(len(t.encode()) for t in batch)
        return path, n_docs, n_bytes
    import zstandard

    path = directory / "corpus.jsonl.zst"
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as out:
        for text in documents(target_bytes):
            out.write((json.dumps({"id": n_docs, "text": text}) + "\n").encode())
            n_docs += 1
            n_bytes += len(text.encode())
    return path, n_docs, n_bytes


_CHILD = r"""
import json, resource, sys
from pathlib import Path
from vocabmetric.building.corpus import tokenize_corpus

source, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
stats = tokenize_corpus("tiktoken:cl100k_base", [source], out, workers=workers, progress=False)
self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"n_documents": stats.n_documents, "n_tokens": stats.n_tokens, "seconds": stats.seconds,
                  "tokens_per_second": stats.tokens_per_second, "peak_rss_mb": self_peak,
                  "largest_worker_peak_rss_mb": child_peak,
                  "corpus_txt_bytes": (out / "corpus.txt").stat().st_size}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.1, help="corpus text size in GB (UTF-8, before compression)")
    parser.add_argument("--format", choices=["parquet", "jsonl.zst"], default="parquet")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--row-group", type=int, default=20_000, help="Parquet rows per row group")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the corpus (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        path, n_docs, n_bytes = write_corpus(Path(tmp), args.format, int(args.gb * 1e9), args.row_group)
        write_seconds = time.perf_counter() - start
        file_bytes = path.stat().st_size
        run = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(Path(tmp) / "out"), str(args.workers)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        result = json.loads(run.stdout.strip().splitlines()[-1])
    payload = {"format": args.format, "text_bytes": n_bytes, "file_bytes": file_bytes, "documents": n_docs,
               "workers": args.workers, "row_group": args.row_group, "write_seconds": write_seconds, **result,
               "command": " ".join(["benchmarks/corpus_memory.py", *sys.argv[1:]]), "machine": machine_info()}
    table = (
        f"Tokenizing a generated corpus with `tokenize_corpus` (tiktoken:cl100k_base, {args.workers} worker "
        f"processes, batch_chars 1M), streamed from one {args.format} file. Peak RSS is `ru_maxrss` of the main "
        f"process and of its largest worker. Command: `.venv/bin/python {payload['command']}`.\n\n"
        "| format | corpus text (GB) | file (GB) | documents | tokens | seconds | M tok/s | "
        "peak RSS main (MB) | peak RSS largest worker (MB) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.format} | {n_bytes / 1e9:.2f} | {file_bytes / 1e9:.2f} | {n_docs:,} | {result['n_tokens']:,} | "
        f"{result['seconds']:.0f} | {result['tokens_per_second'] / 1e6:.2f} | {result['peak_rss_mb']:.0f} | "
        f"{result['largest_worker_peak_rss_mb']:.0f} |\n"
    )
    write_results("corpus_memory", payload, table)
    print(table)


if __name__ == "__main__":
    main()
