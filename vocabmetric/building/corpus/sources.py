"""Corpus sources: how each kind is named, found and streamed as documents.


==================================  =============================================================
``.txt`` ``.txt.gz`` ``.txt.zst``   plain text; a document is a block of lines between blank lines
``.jsonl`` ``.jsonl.gz/.zst``       one JSON object a line; the text is in ``text_field``
``.xml.bz2``                        a Wikipedia ``pages-articles`` dump (articles only)
``.parquet``                        one row a document; the text is the column ``text_field``
a directory of ``*.parquet``        its shards (searched recursively), in name order
a ``datasets`` directory            what ``Dataset.save_to_disk`` (or ``DatasetDict``'s) writes
==================================  =============================================================

Each format has its reader module: :mod:`.text` (plain text, JSON lines), :mod:`.arrow`
(Parquet, ``datasets`` directories), :mod:`.wikipedia`. This module only dispatches:
:func:`iter_documents` streams one source's documents, each below ``MAX_DOC_CHARS``.
"""

from __future__ import annotations

import glob
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ...errors import CorpusError
from . import wikipedia
from .arrow import DATASETS, dataset_texts, is_dataset_dir, parquet_texts
from .text import JSONL_FORMATS, TEXT_FORMATS, json_text, numbered_lines

#: File suffixes, longest first; ``"datasets"`` is a directory written by ``save_to_disk``.
FORMATS = (".txt.gz", ".txt.zst", ".jsonl.gz", ".jsonl.zst", wikipedia.SUFFIX, ".txt", ".jsonl", ".parquet")
#: bpe-openai refuses texts of 1M characters; documents are split below that.
MAX_DOC_CHARS = 200_000


def source_format(path: Path) -> str:
    """The format of a corpus source from its name (or, for a directory, its files)."""
    if is_dataset_dir(path):
        return DATASETS
    name = path.name.lower()
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix
    raise CorpusError(
        f"{path}: unknown corpus format; name files *{', *'.join(FORMATS)} (plain text, JSON lines, a "
        "Wikipedia pages-articles dump, Parquet) or give a directory of Parquet shards or a datasets save_to_disk directory"
    )


def directory_sources(path: Path) -> list[Path]:
    """What a directory source stands for: itself (a ``datasets`` directory) or its Parquet shards."""
    if is_dataset_dir(path):
        return [path]
    shards = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not shards:
        raise CorpusError(f"corpus source {path} is a directory with no *.parquet shards and no datasets "
                          f"save_to_disk files; give files or a glob such as '{path}/*.txt'")
    return shards


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


@dataclass
class Document:
    text: str
    wiki: bool = False  # raw MediaWiki markup, stripped in the worker


def iter_documents(path: Path, *, text_field: str = "text") -> Iterator[Document]:
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
                    yield from (Document(t) for t in _split("".join(block)))
                    block, size = [], 0
            if block:
                yield from (Document(t) for t in _split("".join(block)))
        elif fmt in JSONL_FORMATS:
            for line_no, line in numbered_lines(path, fmt):
                if not line.strip():
                    continue
                yield from (Document(t) for t in _split(json_text(line, path, line_no, text_field)))
        elif fmt in (".parquet", DATASETS):  # their readers name the file in every error
            for text in (parquet_texts if fmt == ".parquet" else dataset_texts)(path, text_field):
                yield from (Document(t) for t in _split(text))
        else:  # its reader names the file and the page in every error
            for text in wikipedia.articles(path):
                yield from (Document(t, wiki=True) for t in _split(text))
    except CorpusError:
        raise
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise CorpusError(f"{path}: cannot read after line {line_no}: {exc} (is the file truncated or corrupt?)") from exc


def _split(text: str) -> Iterator[str]:
    """Cut a long text at line breaks into pieces below MAX_DOC_CHARS."""
    while len(text) > MAX_DOC_CHARS:
        cut = text.rfind("\n", 0, MAX_DOC_CHARS)
        cut = cut if cut > 0 else MAX_DOC_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text
