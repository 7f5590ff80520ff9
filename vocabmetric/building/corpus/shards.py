"""Read a corpus and tokenize it, on all cores, into the line format word2vec reads.

Sources are read by :mod:`.sources` (every format); Wikipedia markup is stripped here, in
the worker processes (:func:`.wikipedia.plain_text`).

Output (``tokenize_corpus``): ``corpus.txt`` in gensim's ``LineSentence`` /
``corpus_file`` format (one document a line, token ids as decimal words, at most
``MAX_LINE_TOKENS`` a line) and the token frequencies ``counts`` (V,) int64.

Memory stays bounded: documents stream from disk, and at most ``2·workers`` batches are
in flight, so a corpus larger than RAM streams through.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..._util.progress import progress_bar
from . import wikipedia
from .sources import Document, iter_documents, source_format
from ...errors import CorpusError
from ...vocab.tokenizer import batch_encoder, load_tokenizer

LOG = logging.getLogger(__name__)

#: gensim's corpus_file reader handles at most 10000 words a line; stay below it.
MAX_LINE_TOKENS = 10000

__all__ = ["CorpusStats", "tokenize_corpus"]


# -- tokenizing ---------------------------------------------------------------------------
_WORKER_ENCODE: dict[str, Callable[[list[str]], list[np.ndarray]]] = {}


def _init_worker(spec: str) -> None:
    """Load the encoder once per process, without the vocabulary tables (:func:`batch_encoder`).

    A worker forked after :func:`_warm_up` already has it: an ``hf:`` file is neither parsed
    nor checked again.
    """
    if spec not in _WORKER_ENCODE:
        _WORKER_ENCODE[spec] = batch_encoder(spec)


def _start_worker(spec: str) -> None:
    """A pool worker: the processes are the parallelism, so the tokenizers library's own
    threads stay off (each would start one per core: workers × cores threads on the cores)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(spec)


def _encode_shard(spec: str, vocab_size: int, docs: list[Document], shard_path: str) -> tuple[int, int, np.ndarray]:
    """Tokenize a batch of documents and write it as one shard; return (docs, tokens, counts)."""
    if spec not in _WORKER_ENCODE:
        _init_worker(spec)
    texts = [wikipedia.plain_text(d.text) if d.wiki else d.text for d in docs]
    arrays = _WORKER_ENCODE[spec](texts)
    all_ids = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    tmp = shard_path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(_id_lines(all_ids, np.array([len(a) for a in arrays], dtype=np.int64), vocab_size))
    os.replace(tmp, shard_path)
    # one bincount per shard, not per document: O(V) per document would dominate short documents
    counts = np.bincount(all_ids, minlength=vocab_size).astype(np.int64)
    return len(docs), len(all_ids), counts


_DIGITS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _id_lines(ids: np.ndarray, doc_lengths: np.ndarray, vocab_size: int) -> bytes:
    """The shard text: each document's ids as decimal words, at most MAX_LINE_TOKENS a line.

    The bytes of ``" ".join(map(str, chunk)) + "\\n"`` per chunk, without a Python string per id
    (that was a sixth of the pipeline's time): a (V, width) table of each id's digits and a
    space is gathered and masked, then each line's last space becomes a newline. O(N·width).
    """
    if not ids.size:
        return b""
    size = max(vocab_size, int(ids.max()) + 1)
    if size not in _DIGITS:
        digits = np.char.encode(np.arange(size).astype(str), "ascii")
        table = np.zeros((size, digits.itemsize + 1), dtype=np.uint8)
        table[:, :-1] = digits.view(np.uint8).reshape(size, digits.itemsize)
        table[table == 0] = ord(" ")  # the byte after each id's digits: its separator
        _DIGITS[size] = table, (np.char.str_len(digits) + 1).astype(np.int64)
    table, widths = _DIGITS[size]
    width = widths[ids]
    out = table[ids][np.arange(table.shape[1]) < width[:, None]]
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    position = np.arange(ids.size) - starts  # within the document
    line_end = ((position + 1) % MAX_LINE_TOKENS == 0) | (position == np.repeat(doc_lengths, doc_lengths) - 1)
    out[(np.cumsum(width) - 1)[line_end]] = ord("\n")
    return out.tobytes()


@dataclass
class CorpusStats:
    """What tokenization produced."""

    n_documents: int
    n_tokens: int
    counts: np.ndarray = field(repr=False)
    seconds: float
    sources: list[str]

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


def _batches(sources: list[Path], text_field: str, batch_chars: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for path in sources:
        for doc in iter_documents(path, text_field=text_field):
            batch.append(doc)
            size += len(doc.text)
            if size >= batch_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _warm_up(spec: str, sources: list[Path]) -> None:
    """Load the encoder (and gensim, for Wikipedia markup) here, before the workers start.

    Importing bpe-openai (about 1 s: it decodes every encoding's table) and gensim (about 1 s)
    once per worker process cost more than tokenizing the demo corpus. Worker processes
    forked after this inherit both; the build needs gensim for word2vec anyway.
    """
    if spec not in _WORKER_ENCODE:
        _init_worker(spec)
    if any(source_format(p) == wikipedia.SUFFIX for p in sources):
        wikipedia.load_filters()


def _tokenize_batches(spec: str, vocab_size: int, batches: Iterator[list[Document]], shard_dir: Path,
                      shards: list[Path], workers: int, collect: Callable) -> None:
    """Tokenize each batch into its shard (in order of the batches), in ``workers`` processes."""
    if workers == 1:
        for i, batch in enumerate(batches):
            shards.append(shard_dir / f"shard-{i:06d}.txt")
            collect(_encode_shard(spec, vocab_size, batch, str(shards[-1])))
        return
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(spec,)) as pool:
        pending: set = set()
        try:
            for i, batch in enumerate(batches):
                shards.append(shard_dir / f"shard-{i:06d}.txt")
                pending.add(pool.submit(_encode_shard, spec, vocab_size, batch, str(shards[-1])))
                if len(pending) >= 2 * workers:  # bounded in flight: the corpus streams
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        collect(f.result())
            for f in pending:
                collect(f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def tokenize_corpus(
    tokenizer_spec: str,
    sources: list[Path],
    out_dir: Path,
    *,
    text_field: str = "text",
    workers: int | None = None,
    batch_chars: int = 1_000_000,
    progress: bool | None = None,
    vocab_size: int | None = None,
) -> CorpusStats:
    """Tokenize ``sources`` into ``out_dir/corpus.txt``; return the stats and counts.

    Batches of about ``batch_chars`` characters are tokenized in ``workers`` processes
    (default: all cores), each written as a shard, then joined in order. ``vocab_size``
    (the length of ``counts``) is read from the tokenizer unless given: pass it when the
    tokenizer is already loaded (loading cl100k_base's tables takes about a second).
    Cost: one pass over the corpus; memory O(workers·batch_chars + V).
    """
    workers = workers or os.cpu_count() or 1
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or load_tokenizer(tokenizer_spec).vocab_size
    counts = np.zeros(vocab_size, dtype=np.int64)
    n_docs = n_tokens = 0
    shards: list[Path] = []
    bar = progress_bar(None, progress, total=None, unit="tok", unit_scale=True, desc="tokenize", mininterval=0.5,
                       leave=True)
    start = time.perf_counter()

    def collect(result):
        nonlocal n_docs, n_tokens
        d, t, c = result
        n_docs += d
        n_tokens += t
        counts.__iadd__(c)
        bar.update(t)

    _warm_up(tokenizer_spec, sources)
    try:
        _tokenize_batches(tokenizer_spec, vocab_size, _batches(sources, text_field, batch_chars), shard_dir,
                          shards, workers, collect)
        bar.close()
        if n_tokens == 0:
            raise CorpusError(f"the corpus ({', '.join(map(str, sources))}) holds no text to tokenize")
        with open(out_dir / "corpus.txt.tmp", "wb") as out:
            for shard in shards:
                with open(shard, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 << 20)
        os.replace(out_dir / "corpus.txt.tmp", out_dir / "corpus.txt")
    except BaseException:
        # nothing half-written may look finished: no shard, no corpus.txt
        bar.close()
        (out_dir / "corpus.txt.tmp").unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    LOG.info("tokenized %d documents, %d tokens in %.1fs (%.2fM tok/s)", n_docs, n_tokens, seconds, n_tokens / seconds / 1e6)
    return CorpusStats(n_docs, n_tokens, counts, seconds, [str(s) for s in sources])
