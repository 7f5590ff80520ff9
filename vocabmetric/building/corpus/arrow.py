"""Parquet files and ``datasets`` ``save_to_disk`` directories, read through pyarrow.

Parquet streams by row group in batches of ``ROWS_PER_BATCH`` rows of the one column; a
``datasets`` directory's Arrow files record batch by record batch (``datasets`` itself is not
imported). Memory is one batch, whatever the corpus size. Errors are :class:`CorpusError`
naming the file and the columns there are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ...errors import CorpusError

#: Rows read at a time from Parquet and Arrow: the reader's memory is one such batch.
ROWS_PER_BATCH = 1024
DATASETS = "datasets"


def is_dataset_dir(path: Path) -> bool:
    """A directory ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
    (``dataset_dict.json``) wrote."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


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
