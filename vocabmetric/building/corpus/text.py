"""Plain text and JSON lines (``.txt``, ``.jsonl``; each also ``.gz`` or ``.zst``).

A text document is a block of lines between blank lines; a JSON line is one document, its
text in ``text_field``. Lines stream one at a time (gzip and zstd decompressed as they are
read) and are decoded as strict UTF-8, so an invalid byte is reported at its own line.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

import zstandard

from ...errors import CorpusError

TEXT_FORMATS = (".txt", ".txt.gz", ".txt.zst")
JSONL_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst")


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
        except zstandard.ZstdError as exc:
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
