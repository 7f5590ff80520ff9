"""Read a corpus and tokenize it, on all cores, into the line format word2vec reads.

Formats (:mod:`vocabmetric.corpus_formats`): ``.txt``, ``.jsonl`` (each also ``.gz`` or
``.zst``), Wikipedia ``.xml.bz2`` dumps (markup stripped as gensim's ``filter_wiki`` does, in
the worker processes), ``.parquet`` files and directories of shards, and ``datasets``
``save_to_disk`` directories.

Output (``tokenize_corpus``): ``corpus.txt`` in gensim's ``LineSentence`` /
``corpus_file`` format (one document a line, token ids as decimal words, at most
``MAX_LINE_TOKENS`` a line) and the token frequencies ``counts`` (V,) int64.

Memory stays bounded: documents stream from disk, and at most ``2·workers`` batches are
in flight, so a corpus larger than RAM streams through.
"""

from __future__ import annotations

import bz2
import glob
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ._progress import progress_bar
from .corpus_formats import (DATASETS, FORMATS, JSONL_FORMATS, TEXT_FORMATS, dataset_texts, directory_sources,
                             json_text, numbered_lines, parquet_texts, source_format, wiki_articles)
from .errors import CorpusError
from .tokenizers import batch_encoder, load_tokenizer

LOG = logging.getLogger(__name__)

#: gensim's corpus_file reader handles at most 10000 words a line; stay below it.
MAX_LINE_TOKENS = 10000
#: bpe-openai refuses texts of 1M characters; documents are split below that.
MAX_DOC_CHARS = 200_000

__all__ = ["FORMATS", "expand_sources", "iter_documents", "source_format", "tokenize_corpus"]


def expand_sources(patterns: Iterable[str], base_dir: Path | None = None) -> list[Path]:
    """Resolve paths and globs (relative to ``base_dir``); each must match a readable file, a
    directory of Parquet shards (expanded to its shards) or a ``datasets`` directory."""
    out: list[Path] = []
    for pattern in patterns:
        full = Path(pattern).expanduser()
        if not full.is_absolute() and base_dir is not None:
            full = base_dir / full
        matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True)) if glob.has_magic(str(full)) else [full]
        if not matches or not all(m.exists() for m in matches):
            raise CorpusError(f"corpus source {pattern!r} matches no file (looked for {full})")
        for m in matches:
            for source in directory_sources(m) if m.is_dir() else [m]:
                source_format(source)
                if not os.access(source, os.R_OK):
                    raise CorpusError(f"corpus source {source} is not readable (check its permissions)")
                out.append(source)
    return out


# -- reading ------------------------------------------------------------------------------
@dataclass
class _Doc:
    text: str
    wiki: bool = False  # raw MediaWiki markup, stripped in the worker


def iter_documents(path: Path, *, text_field: str = "text") -> Iterator[_Doc]:
    """Stream the documents of one file. Errors name the file and the line (or page).

    Lines are decoded one by one, so an invalid UTF-8 byte is reported at its own line.
    """
    fmt = source_format(path)
    line_no = 0
    try:
        if fmt in TEXT_FORMATS:
            block: list[str] = []
            size = 0
            for line_no, line in numbered_lines(path, fmt):
                if line.strip():
                    block.append(line)
                    size += len(line)
                    if size < MAX_DOC_CHARS:
                        continue
                if block:
                    yield from (_Doc(t) for t in _split("".join(block)))
                    block, size = [], 0
            if block:
                yield from (_Doc(t) for t in _split("".join(block)))
        elif fmt in JSONL_FORMATS:
            for line_no, line in numbered_lines(path, fmt):
                if not line.strip():
                    continue
                yield from (_Doc(t) for t in _split(json_text(line, path, line_no, text_field)))
        elif fmt in (".parquet", DATASETS):  # their readers name the file in every error
            for text in (parquet_texts if fmt == ".parquet" else dataset_texts)(path, text_field):
                yield from (_Doc(t) for t in _split(text))
        else:
            with bz2.open(path, "rb") as fh:
                for line_no, text in enumerate(wiki_articles(fh), 1):
                    yield from (_Doc(t, wiki=True) for t in _split(text))
    except CorpusError:
        raise
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        where = f"after line {line_no}" if fmt != ".xml.bz2" else f"after page {line_no}"
        raise CorpusError(f"{path}: cannot read {where}: {exc} (is the file truncated or corrupt?)") from exc
    except Exception as exc:  # the XML parser's errors
        raise CorpusError(f"{path}: cannot parse after page {line_no}: {exc} (is the dump truncated or corrupt?)") from exc


def _split(text: str) -> Iterator[str]:
    """Cut a long text at line breaks into pieces below MAX_DOC_CHARS."""
    while len(text) > MAX_DOC_CHARS:
        cut = text.rfind("\n", 0, MAX_DOC_CHARS)
        cut = cut if cut > 0 else MAX_DOC_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


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


def _encode_shard(spec: str, vocab_size: int, docs: list[_Doc], shard_path: str) -> tuple[int, int, np.ndarray]:
    """Tokenize a batch of documents and write it as one shard; return (docs, tokens, counts)."""
    if spec not in _WORKER_ENCODE:
        _init_worker(spec)
    texts = [_clean_wiki(d.text) if d.wiki else d.text for d in docs]
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


def _clean_wiki(markup: str) -> str:
    """Plain text of MediaWiki markup: exactly gensim's ``filter_wiki(markup)``, faster.

    gensim's filter is a loop of regular expressions plus a per-character Python scan for
    ``{{templates}}``; on the demo dump that made markup stripping, not the Rust
    tokenizer, the bottleneck of the pipeline. This runs the same steps in the same order
    with gensim's own patterns, but (1) finds templates by scanning only the braces,
    (2) skips a table pattern when the text holds none of the characters it needs to
    match, and (3) starts the table-cell pattern at its ``|``/``!`` so the regex engine
    can search for it. The output is identical (``tests/test_corpus.py`` checks it on
    the demo dump).
    """
    from gensim import utils
    from gensim.corpora import wikicorpus as wiki

    text = utils.decode_htmlentities(utils.to_unicode(markup, "utf8", errors="ignore"))
    text = wiki.RE_P2.sub("", text)  # the trailing interlanguage links
    text = wiki.remove_file(_remove_templates(text))
    for _ in range(3):  # gensim: until nothing changes, at most three passes
        old = text
        for pattern, repl in ((wiki.RE_P0, ""), (wiki.RE_P1, ""), (wiki.RE_P9, ""), (wiki.RE_P10, ""),
                              (wiki.RE_P11, ""), (wiki.RE_P14, ""), (wiki.RE_P5, "\\3"), (wiki.RE_P6, "\\2")):
            text = pattern.sub(repl, text)
        text = text.replace("!!", "\n|").replace("|-||", "\n|")
        if "{|" in text or "|-" in text or "|}" in text:
            text = wiki.RE_P12.sub("\n", text)
        text = text.replace("|||", "|\n|").replace("||", "\n|")
        text = _TABLE_CELL.sub("\n", text)
        if any(key in text for key in _FORMATTING_KEYS):
            text = wiki.RE_P17.sub("\n", text)
        text = text.replace("[]", "")
        if old == text:
            break
    return text.replace("[", "").replace("]", "")


#: gensim's RE_P13 (table cell marks), anchored on the ``|`` or ``!`` it removes instead of on a
#: look-behind, so that the engine searches for that character: the same matches.
_TABLE_CELL = re.compile(r"[|!](?<=(?:\n[ ]|\n\n|[ ]{2}|.\n|.\t)[|!])(?:[^[\]\n]*?\|)*")
#: RE_P17 (table formatting lines) cannot match a text without one of these.
_FORMATTING_KEYS = ("bgcolor", "colspan", "rowspan", "style=", "class=", "align=", "scope=")
_BRACE = re.compile(r"[{}]")


def _remove_templates(text: str) -> str:
    """gensim's ``remove_template``: drop every ``{{...}}`` (nested; an unclosed one runs to the end).

    The same scan over the braces only, not over every character.
    """
    if "{{" not in text:
        return text
    pieces: list[str] = []
    kept_from = 0
    start = depth_open = depth_close = 0
    inside = False
    for match in _BRACE.finditer(text):
        i = match.start()
        brace = text[i]
        if not inside and brace == "{" and i > 0 and text[i - 1] == "{":
            start, inside, depth_open, depth_close = i - 1, True, 1, 0
        if inside:
            if brace == "{":
                depth_open += 1
            else:
                depth_close += 1
            if depth_open == depth_close:
                pieces.append(text[kept_from:start])
                kept_from, inside = i + 1, False
    pieces.append(text[kept_from:start] if inside else text[kept_from:])
    return "".join(pieces)


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


def _batches(sources: list[Path], text_field: str, batch_chars: int) -> Iterator[list[_Doc]]:
    batch: list[_Doc] = []
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
    if any(source_format(p) == ".xml.bz2" for p in sources):
        import gensim.corpora.wikicorpus  # noqa: F401


def _tokenize_batches(spec: str, vocab_size: int, batches: Iterator[list[_Doc]], shard_dir: Path,
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
