"""Corpora as people keep them: Parquet files and shard directories, .txt.zst and .jsonl.zst,
datasets save_to_disk directories. Each gives the same tokens as the same texts in .jsonl;
each bad input is one CorpusError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import lee_texts, train_bpe
from vocabmetric.building.corpus import expand_sources, iter_documents, tokenize_corpus
from vocabmetric.errors import CorpusError


@pytest.fixture(scope="module")
def hf_spec(tmp_path_factory):
    path = train_bpe(tmp_path_factory.mktemp("hf") / "tokenizer.json", vocab_size=400, texts=lee_texts()[:100])
    return f"hf:{path}"


def _docs(n: int = 40) -> list[str]:
    texts = lee_texts()
    docs = [texts[i] + "\n" + texts[i + 1] for i in range(0, 2 * n, 2)]
    docs[min(3, n - 1)] = "Ünïcödé — ταυτότητα, 東京, emoji 🙂 and <|endoftext|> as text"
    return docs


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def _zst(data: bytes, frames: int = 1) -> bytes:
    import zstandard

    step = -(-len(data) // frames)  # several frames, concatenated, as `zstd` and `cat` make them
    return b"".join(zstandard.ZstdCompressor(level=3).compress(data[i : i + step]) for i in range(0, len(data), step))


def _parquet(path: Path, docs: list[str], row_group_size: int = 7, **kw) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "body": docs, "score": [0.5] * len(docs)})
    pq.write_table(table, path, row_group_size=row_group_size, **kw)
    return path


def _tokens(hf_spec: str, sources: list[Path], out: Path, **kw) -> tuple[bytes, list[int]]:
    stats = tokenize_corpus(hf_spec, sources, out, text_field="body", workers=1, batch_chars=3000,
                            progress=False, **kw)
    return (out / "corpus.txt").read_bytes(), stats.counts.tolist()


@pytest.fixture(scope="module")
def reference(hf_spec, tmp_path_factory):
    """The docs as plain .jsonl, tokenized: what every other format must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    (root / "docs.jsonl").write_bytes(_jsonl(_docs()))
    return _tokens(hf_spec, [root / "docs.jsonl"], root / "out")


def test_jsonl_zst_several_frames(hf_spec, reference, tmp_path):
    src = tmp_path / "docs.jsonl.zst"
    src.write_bytes(_zst(_jsonl(_docs()), frames=3))
    assert _tokens(hf_spec, expand_sources([str(src)]), tmp_path / "out") == reference


def test_txt_zst_equals_txt(hf_spec, tmp_path):
    text = "\n\n".join(_docs()).encode()
    (tmp_path / "docs.txt").write_bytes(text)
    (tmp_path / "docs.txt.zst").write_bytes(_zst(text, frames=2))
    assert (_tokens(hf_spec, [tmp_path / "docs.txt.zst"], tmp_path / "a")
            == _tokens(hf_spec, [tmp_path / "docs.txt"], tmp_path / "b"))
    assert len(list(iter_documents(tmp_path / "docs.txt.zst"))) == len(_docs())


def test_parquet_file_streams_by_row_group(hf_spec, reference, tmp_path):
    import pyarrow.parquet as pq

    src = _parquet(tmp_path / "docs.parquet", _docs())
    assert pq.ParquetFile(src).num_row_groups == 6
    assert _tokens(hf_spec, expand_sources(["*.parquet"], tmp_path), tmp_path / "out") == reference


def test_directory_of_parquet_shards_in_name_order(hf_spec, reference, tmp_path):
    docs = _docs()
    shards = tmp_path / "hub-dataset" / "data"
    shards.mkdir(parents=True)
    for k, part in enumerate((docs[:15], docs[15:16], docs[16:])):
        _parquet(shards / f"train-{k:05d}-of-00003.parquet", part)
    sources = expand_sources(["hub-dataset"], tmp_path)
    assert [p.name for p in sources] == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert _tokens(hf_spec, sources, tmp_path / "out") == reference


def test_datasets_save_to_disk_directory(hf_spec, reference, tmp_path):
    import datasets

    docs = _docs()
    ds = datasets.Dataset.from_dict({"id": list(range(len(docs))), "body": docs})
    ds.save_to_disk(str(tmp_path / "saved"), max_shard_size="4KB")
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1
    assert _tokens(hf_spec, expand_sources(["saved"], tmp_path), tmp_path / "out") == reference
    # a DatasetDict: every split, in its saved order
    datasets.DatasetDict({"train": ds.select(range(25)), "test": ds.select(range(25, len(docs)))}).save_to_disk(
        str(tmp_path / "splits"))
    assert _tokens(hf_spec, expand_sources(["splits"], tmp_path), tmp_path / "out2") == reference


def test_a_corpus_section_of_parquet_shards_builds(hf_spec, tmp_path):
    from vocabmetric.building.pipeline import load_config

    (tmp_path / "shards").mkdir()
    _parquet(tmp_path / "shards" / "a.parquet", _docs(5))
    config = tmp_path / "c.toml"
    config.write_text(f'[tokenizer]\nspec = "{hf_spec}"\n[corpus]\nsources = ["shards"]\ntext_field = "body"\n')
    assert load_config(config)[0].corpus.sources == ["shards"]


# -- bad input -------------------------------------------------------------------------------
def _fails(hf_spec, tmp_path, src: Path, match: str, **kw) -> CorpusError:
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=match) as info:
        tokenize_corpus(hf_spec, [src], out, workers=1, batch_chars=200, progress=False, **kw)
    assert str(src) in str(info.value)
    assert not (out / "corpus.txt").exists()
    return info.value


def test_parquet_without_the_column_lists_the_columns(hf_spec, tmp_path):
    src = _parquet(tmp_path / "docs.parquet", _docs(3))
    _fails(hf_spec, tmp_path, src, r"no column 'text' \(it has: id, body, score\).*corpus\.text_field")
    _fails(hf_spec, tmp_path, src, r"column 'score' is double, not a string", text_field="score")


def test_corrupt_parquet_names_the_file(hf_spec, tmp_path):
    full = _parquet(tmp_path / "full.parquet", _docs())
    data = full.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    _fails(hf_spec, tmp_path, cut, r"cut\.parquet: cannot read as Parquet.*truncated or corrupt", text_field="body")
    data = _parquet(tmp_path / "crc.parquet", _docs(), write_page_checksum=True, compression="none").read_bytes()
    flipped = bytearray(data)
    at = data.index(_docs()[20][:40].encode())
    flipped[at : at + 4] = b"XXXX"  # inside a data page: its CRC fails
    bad = tmp_path / "flipped.parquet"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CorpusError, match=r"flipped\.parquet"):
        tokenize_corpus(hf_spec, [bad], tmp_path / "out2", workers=1, text_field="body", progress=False)


@pytest.mark.parametrize("name", ["docs.jsonl.zst", "docs.txt.zst"])
def test_truncated_or_garbage_zst_names_the_file(hf_spec, tmp_path, name):
    data = _zst(_jsonl(_docs()))
    src = tmp_path / name
    src.write_bytes(data[: len(data) // 2])
    _fails(hf_spec, tmp_path, src, r"zstd stream ends inside a frame.*truncated or corrupt", text_field="body")
    src.write_bytes(b"this is not zstd at all\n" * 50)
    _fails(hf_spec, tmp_path, src, r"cannot read after line 0: zstd: .*truncated or corrupt", text_field="body")


def test_zst_line_errors_keep_their_line_numbers(hf_spec, tmp_path):
    src = tmp_path / "docs.jsonl.zst"
    src.write_bytes(_zst(_jsonl(_docs(4)) + b'{"body": "unterminated\n'))
    _fails(hf_spec, tmp_path, src, "line 5 is not valid JSON", text_field="body")
    src.write_bytes(_zst(b'{"body": "fine"}\n{"body": "\xff"}\n'))
    _fails(hf_spec, tmp_path, src, "line 2 is not valid UTF-8", text_field="body")


def test_bad_datasets_directories(hf_spec, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": _docs(4)}).save_to_disk(str(tmp_path / "saved"))
    _fails(hf_spec, tmp_path, tmp_path / "saved", r"no column 'text' \(it has: body\)")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    _fails(hf_spec, tmp_path, tmp_path / "saved", rf"{arrow.name}: cannot read as an Arrow stream", text_field="body")
    arrow.unlink()
    _fails(hf_spec, tmp_path, tmp_path / "saved", rf"state\.json names Arrow file\(s\) that are not there: {arrow.name}",
           text_field="body")


def test_directory_with_nothing_to_read(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"empty is a directory with no \*\.parquet shards"):
        expand_sources(["empty"], tmp_path)
