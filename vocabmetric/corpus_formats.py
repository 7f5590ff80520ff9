"""Corpus file formats: how each kind of source is named, found and streamed.

==================================  =============================================================
``.txt`` ``.txt.gz`` ``.txt.zst``   plain text; a document is a block of lines between blank lines
``.jsonl`` ``.jsonl.gz/.zst``       one JSON object a line; the text is in ``text_field``
``.xml.bz2``                        a Wikipedia ``pages-articles`` dump (articles only)
``.parquet``                        one row a document; the text is the column ``text_field``
a directory of ``*.parquet``        its shards (searched recursively), in name order
a ``datasets`` directory            what ``Dataset.save_to_disk`` (or ``DatasetDict``'s) writes
==================================  =============================================================

Everything streams: lines one at a time (gzip and zstd decompressed as they are read),
Parquet by row group in batches of ``ROWS_PER_BATCH`` rows of the one column, a ``datasets``
directory's Arrow files record batch by record batch (pyarrow; ``datasets`` itself is not
imported). Memory is one batch, whatever the corpus size. Errors are :class:`CorpusError`
naming the file (and the line, or the columns there are).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import Iterator

from .errors import CorpusError

LOG = logging.getLogger(__name__)

#: File suffixes, longest first; ``"datasets"`` is a directory written by ``save_to_disk``.
FORMATS = (".txt.gz", ".txt.zst", ".jsonl.gz", ".jsonl.zst", ".xml.bz2", ".txt", ".jsonl", ".parquet")
TEXT_FORMATS = (".txt", ".txt.gz", ".txt.zst")
JSONL_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DATASETS = "datasets"
#: Rows read at a time from Parquet and Arrow: the reader's memory is one such batch.
ROWS_PER_BATCH = 1024


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


def is_dataset_dir(path: Path) -> bool:
    """A directory ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
    (``dataset_dict.json``) wrote."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def directory_sources(path: Path) -> list[Path]:
    """What a directory source stands for: itself (a ``datasets`` directory) or its Parquet shards."""
    if is_dataset_dir(path):
        return [path]
    shards = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not shards:
        raise CorpusError(f"corpus source {path} is a directory with no *.parquet shards and no datasets "
                          f"save_to_disk files; give files or a glob such as '{path}/*.txt'")
    return shards


# -- lines ---------------------------------------------------------------------------------
def numbered_lines(path: Path, fmt: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line (split at ``\\n`` only), decoded as strict UTF-8."""
    with _open_binary(path, fmt) as fh:
        line_no = 0
        try:
            for line_no, raw in enumerate(fh, 1):
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(
                        f"{path}: line {line_no} is not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                        "re-encode the file as UTF-8"
                    ) from None
        except CorpusError:
            raise
        except Exception as exc:
            if type(exc).__name__ != "ZstdError":
                raise
            raise CorpusError(f"{path}: cannot read after line {line_no}: zstd: {exc} "
                              "(is the file truncated or corrupt?)") from exc


def _open_binary(path: Path, fmt: str):
    if fmt.endswith(".gz"):
        return gzip.open(path, "rb")
    if fmt.endswith(".zst"):
        return io.BufferedReader(ZstdReader(path), 1 << 20)
    return open(path, "rb")


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file (one frame or several, concatenated), read
    ``CHUNK`` compressed bytes at a time.

    ``zstandard``'s ``stream_reader`` ends silently on a truncated file, dropping its tail;
    here a file that ends inside a frame is a :class:`CorpusError`.
    """

    CHUNK = 1 << 20

    def __init__(self, path: Path):
        import zstandard

        self._path = path
        self._fh = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._pending):
            chunk = self._fh.read(self.CHUNK)
            if not chunk:
                if self._in_frame:
                    raise CorpusError(f"{self._path}: the zstd stream ends inside a frame "
                                      "(is the file truncated or corrupt?)")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self._frame.decompress(chunk))
            self._in_frame = True
            if not self._frame.eof:
                break
            chunk, self._frame, self._in_frame = self._frame.unused_data, self._dctx.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._fh.close()
        super().close()


def json_text(line: str, path: Path, line_no: int, text_field: str) -> str:
    """The ``text_field`` string of one JSON line; errors name the file, line and fields."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: line {line_no} is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(obj, dict) or text_field not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CorpusError(
            f"{path}: line {line_no} has no field {text_field!r} (it has: {keys}); "
            "set corpus.text_field in the config"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{path}: line {line_no}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


# -- columns -------------------------------------------------------------------------------
def parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    """The strings of column ``text_field`` of a Parquet file, row group by row group (nulls skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)  # where the writer stored CRCs
        columns = pf.schema_arrow.names
        if text_field not in columns:
            raise CorpusError(f"{path}: no column {text_field!r} (it has: {', '.join(columns)}); "
                              "set corpus.text_field in the config")
        _check_string(pf.schema_arrow.field(text_field).type, path, text_field)
        # One reader per row group: a single iter_batches over the whole file keeps what it
        # read in Arrow's pool (236 MB after a 0.25 GB file), this stays at one row group's pages.
        for group in range(pf.metadata.num_row_groups):
            for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[group], columns=[text_field]):
                yield from (t for t in batch.column(0).to_pylist() if t)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read as Parquet: {exc} (is the file truncated or corrupt?)") from exc


def dataset_texts(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` strings of a ``save_to_disk`` directory: its Arrow files in order
    (every split of a ``DatasetDict``, in its ``splits`` order), one record batch at a time."""
    for arrow_file in dataset_files(path):
        yield from _arrow_texts(arrow_file, text_field)


def dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a ``datasets`` directory, from its ``state.json`` (or ``dataset_dict.json``)."""
    if (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits") or []
        return [f for split in splits for f in dataset_files(path / split)]
    state = _json_file(path / "state.json")
    files = [path / entry["filename"] for entry in state.get("_data_files", []) if "filename" in entry]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CorpusError(f"{path}: state.json names Arrow file(s) that are not there: {', '.join(missing)}; "
                          "save the dataset again (Dataset.save_to_disk)")
    return files


def _json_file(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot read as JSON: {exc}; save the dataset again (save_to_disk)") from exc
    return obj if isinstance(obj, dict) else {}


def _arrow_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    try:
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            names = reader.schema.names
            if text_field not in names:
                raise CorpusError(f"{path}: no column {text_field!r} (it has: {', '.join(names)}); "
                                  "set corpus.text_field in the config")
            _check_string(reader.schema.field(text_field).type, path, text_field)
            column = names.index(text_field)
            for batch in reader:
                for lo in range(0, batch.num_rows, ROWS_PER_BATCH):
                    yield from (t for t in batch.column(column).slice(lo, ROWS_PER_BATCH).to_pylist() if t)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read as an Arrow stream: {exc} (is the file truncated or corrupt?)") from exc


def _check_string(arrow_type, path: Path, text_field: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
        raise CorpusError(f"{path}: column {text_field!r} is {arrow_type}, not a string; "
                          "set corpus.text_field to the text column")


# -- Wikipedia -----------------------------------------------------------------------------
def wiki_articles(fh) -> Iterator[str]:
    """The raw markup of each article (namespace 0, not a redirect) of a MediaWiki XML dump.

    The same pages as gensim's ``extract_pages(fh, filter_namespaces=("0",))``, without
    importing gensim in the reading process. Each ``<page>`` is cleared once read, so memory
    stays at one page.
    """
    from xml.etree.ElementTree import iterparse

    page_tag = ns_tag = text_tag = None
    for _event, elem in iterparse(fh, events=("end",)):
        if page_tag is None:  # the namespace of the dump's schema version, from the first element
            ns = elem.tag[1 : elem.tag.index("}")] if elem.tag.startswith("{") else ""
            if not ns.startswith("http://www.mediawiki.org/xml/export-"):
                raise ValueError(f"{ns or elem.tag!r} is not a MediaWiki export namespace")
            page_tag, ns_tag, text_tag = f"{{{ns}}}page", f"{{{ns}}}ns", f"./{{{ns}}}revision/{{{ns}}}text"
        if elem.tag != page_tag:
            continue
        namespace, text = elem.find(ns_tag), elem.find(text_tag)
        if namespace is not None and namespace.text == "0" and text is not None and text.text:
            if not text.text.lstrip()[:9].lower().startswith("#redirect"):
                yield text.text
        elem.clear()
