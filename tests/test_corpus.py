"""Corpus reading and tokenization: every format, token counts, bounded lines, corrupt input."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, lee_texts, train_bpe
from vocabmetric.building.corpus import expand_sources, iter_documents, tokenize_corpus
from vocabmetric.building.corpus.shards import MAX_LINE_TOKENS
from vocabmetric.errors import CorpusError

WIKI_NS = "http://www.mediawiki.org/xml/export-0.10/"


@pytest.fixture(scope="module")
def hf_spec(tmp_path_factory):
    path = train_bpe(tmp_path_factory.mktemp("hf") / "tokenizer.json", vocab_size=400, texts=lee_texts()[:100])
    return f"hf:{path}"


@pytest.fixture(scope="module")
def raw_hf(hf_spec):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(hf_spec[3:])


def _encode(raw_hf, text: str) -> list[int]:
    return raw_hf.encode(text, add_special_tokens=False).ids


def _lines(out: Path) -> list[list[int]]:
    return [[int(w) for w in line.split()] for line in (out / "corpus.txt").read_text().splitlines()]


def _assert_nothing_finished_left(out: Path) -> None:
    assert not (out / "corpus.txt").exists()
    assert not list(out.rglob("shard-*.txt")), "a finished shard was left behind"


def _docs(n: int = 6) -> list[str]:
    texts = lee_texts()
    return [texts[i] + "\n" + texts[i + 1] + "\n" for i in range(0, 2 * n, 2)]


def _write_txt(path: Path, docs: list[str]) -> Path:
    data = "\n".join(docs)  # a blank line between documents
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data.encode()))
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    data = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs))
    path.write_bytes(gzip.compress(data.encode()) if path.name.endswith(".gz") else data.encode())
    return path


def _wiki_page(title: str, ns: int, text: str, page_id: int) -> str:
    from xml.sax.saxutils import escape

    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{page_id}</id><revision><id>{page_id + 100}</id>"
            f"<text xml:space=\"preserve\">{escape(text)}</text></revision></page>\n")


WIKI_PAGES = [
    ("Alpha", 0, "'''Alpha''' is the first [[Greek alphabet|letter]] of the alphabet.{{cite web|url=http://x.org}}"
                 "<ref>a footnote</ref> It is used in mathematics.\n\n[[Category:Letters]]"),
    ("Alpha (letter)", 0, "#REDIRECT [[Alpha]]"),
    ("Talk:Alpha", 1, "Talk pages are not articles: zebra zebra."),
    ("Beta", 0, "'''Beta''' follows [[Alpha]]. See [http://example.org the example site]."),
]


def _write_wiki(path: Path, pages=WIKI_PAGES) -> Path:
    body = "".join(_wiki_page(t, ns, text, i + 1) for i, (t, ns, text) in enumerate(pages))
    xml = f'<mediawiki xmlns="{WIKI_NS}" version="0.10" xml:lang="en"><siteinfo><sitename>W</sitename></siteinfo>\n{body}</mediawiki>\n'
    path.write_bytes(bz2.compress(xml.encode()))
    return path


# -- formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["docs.txt", "docs.txt.gz"])
def test_text_documents_are_blocks_between_blank_lines(tmp_path, hf_spec, raw_hf, name):
    docs = _docs()
    src = _write_txt(tmp_path / name, docs)
    stats = tokenize_corpus(hf_spec, [src], tmp_path / "out", workers=1, progress=False)
    lines = _lines(tmp_path / "out")
    assert lines == [_encode(raw_hf, d) for d in docs]
    assert stats.n_documents == len(docs)
    assert stats.n_tokens == sum(map(len, lines))


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_jsonl_with_a_custom_text_field(tmp_path, hf_spec, raw_hf, name):
    docs = _docs()
    src = _write_jsonl(tmp_path / name, docs, field="body")
    stats = tokenize_corpus(hf_spec, [src], tmp_path / "out", text_field="body", workers=1, progress=False)
    assert _lines(tmp_path / "out") == [_encode(raw_hf, d) for d in docs]
    assert stats.n_documents == len(docs)


def test_wikipedia_dump_articles_only_markup_stripped(tmp_path, hf_spec, raw_hf):
    from gensim.corpora.wikicorpus import filter_wiki

    src = _write_wiki(tmp_path / "tiny-pages-articles.xml.bz2")
    stats = tokenize_corpus(hf_spec, [src], tmp_path / "out", workers=1, progress=False)
    articles = [text for _, ns, text in WIKI_PAGES if ns == 0 and not text.startswith("#REDIRECT")]
    assert _lines(tmp_path / "out") == [_encode(raw_hf, filter_wiki(t)) for t in articles]
    assert stats.n_documents == 2
    text = (tmp_path / "out" / "corpus.txt").read_text()
    decoded = raw_hf.decode([int(w) for w in text.split()])
    assert "letter" in decoded and "mathematics" in decoded and "the example site" in decoded
    for markup in ("[[", "{{", "<ref", "Category", "Greek alphabet", "zebra", "http"):
        assert markup not in decoded


def test_real_wikipedia_sample_streams_pages():
    docs = iter_documents(DATA / "enwiki-sample-pages-articles.xml.bz2")
    first = [next(docs) for _ in range(3)]
    assert all(d.wiki and len(d.text) > 100 for d in first)
    assert not any(d.text.lstrip().lower().startswith("#redirect") for d in first)


def test_counts_equal_a_direct_encode_across_sources(tmp_path, hf_spec, raw_hf):
    docs = _docs(8)
    sources = [_write_txt(tmp_path / "a.txt.gz", docs[:4]), _write_jsonl(tmp_path / "b.jsonl", docs[4:])]
    stats = tokenize_corpus(hf_spec, sources, tmp_path / "out", workers=1, batch_chars=300, progress=False)
    expected = np.bincount(np.concatenate([_encode(raw_hf, d) for d in docs]), minlength=raw_hf.get_vocab_size())
    assert stats.counts.dtype == np.int64
    assert np.array_equal(stats.counts, expected)
    assert stats.n_tokens == expected.sum()
    assert not (tmp_path / "out" / "shards").exists()


def test_parallel_workers_give_the_same_corpus_in_order(tmp_path, hf_spec):
    docs = _docs(12)
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    one = tokenize_corpus(hf_spec, [src], tmp_path / "one", workers=1, batch_chars=500, progress=False)
    two = tokenize_corpus(hf_spec, [src], tmp_path / "two", workers=2, batch_chars=500, progress=False)
    assert (tmp_path / "one" / "corpus.txt").read_bytes() == (tmp_path / "two" / "corpus.txt").read_bytes()
    assert np.array_equal(one.counts, two.counts)


def test_cl100k_counts_and_lines_within_gensims_limit(tmp_path):
    from vocabmetric.vocab.tokenizer import load_tokenizer

    tok = load_tokenizer("tiktoken:cl100k_base")
    long_line = " ".join(f"w{i % 977}" for i in range(60_000))  # one line, far above 10000 tokens
    huge_line = "word " * 240_000  # 1.2M characters on one line: above bpe-openai's per-text limit
    src = _write_txt(tmp_path / "long.txt", [long_line + "\n", "short document\n", huge_line + "\n"])
    stats = tokenize_corpus("tiktoken:cl100k_base", [src], tmp_path / "out", workers=1, progress=False)
    lines = _lines(tmp_path / "out")
    assert max(map(len, lines)) <= MAX_LINE_TOKENS
    expected = sum(len(tok.encode(t)) for t in (long_line, "short document", huge_line))
    # a long document may be cut at MAX_DOC_CHARS, which can change a token or two at each cut
    assert abs(stats.n_tokens - expected) <= 10
    assert stats.counts.sum() == stats.n_tokens == sum(map(len, lines))
    assert stats.counts[tok.encode(" document")[0]] >= 1


# -- bad input ----------------------------------------------------------------------------
def test_missing_sources_directories_and_unknown_formats(tmp_path):
    with pytest.raises(CorpusError, match="nothing-here"):
        expand_sources(["nothing-here.txt"], tmp_path)
    with pytest.raises(CorpusError, match=r"\*\.nomatch"):
        expand_sources(["*.nomatch.txt"], tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CorpusError, match="folder is a directory"):
        expand_sources(["folder"], tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data\.csv.*unknown corpus format"):
        expand_sources(["data.csv"], tmp_path)
    _write_txt(tmp_path / "a.txt", ["x\n"])
    _write_txt(tmp_path / "b.txt", ["y\n"])
    assert [p.name for p in expand_sources(["*.txt"], tmp_path)] == ["a.txt", "b.txt"]


def _fails(tmp_path, hf_spec, src: Path, match: str, **kw) -> CorpusError:
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=match) as info:
        tokenize_corpus(hf_spec, [src], out, workers=kw.pop("workers", 1), batch_chars=200, progress=False, **kw)
    assert str(src) in str(info.value)
    _assert_nothing_finished_left(out)
    return info.value


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_line_names_file_and_line(tmp_path, hf_spec, workers):
    src = _write_jsonl(tmp_path / "docs.jsonl", _docs(4))
    with open(src, "a") as fh:
        fh.write('{"text": "unterminated\n')
    _fails(tmp_path, hf_spec, src, "line 5 is not valid JSON", workers=workers)


def test_missing_field_names_file_line_and_field(tmp_path, hf_spec):
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    _fails(tmp_path, hf_spec, src, r"line 2 has no field 'text' \(it has: body\)")
    src.write_text(json.dumps({"text": 3}) + "\n")
    _fails(tmp_path, hf_spec, src, "line 1: field 'text' is int")


@pytest.mark.parametrize("name", ["docs.txt.gz", "docs.jsonl.gz"])
def test_truncated_gzip(tmp_path, hf_spec, name):
    src = tmp_path / name
    full = (_write_txt if name.startswith("docs.txt") else _write_jsonl)(tmp_path / f"full-{name}", _docs(30) * 4)
    data = full.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    _fails(tmp_path, hf_spec, src, r"truncated or corrupt")


def test_truncated_bz2_wikipedia_dump(tmp_path, hf_spec):
    src = tmp_path / "cut-pages-articles.xml.bz2"
    src.write_bytes((DATA / "enwiki-sample-pages-articles.xml.bz2").read_bytes()[:150_000])
    _fails(tmp_path, hf_spec, src, r"after page \d+")


def test_malformed_wikipedia_xml(tmp_path, hf_spec):
    src = tmp_path / "bad-pages-articles.xml.bz2"
    src.write_bytes(bz2.compress(f'<mediawiki xmlns="{WIKI_NS}"><page><title>x</tit'.encode()))
    _fails(tmp_path, hf_spec, src, "page")


@pytest.mark.parametrize("name", ["docs.txt", "docs.jsonl.gz"])
def test_invalid_utf8_names_the_line(tmp_path, hf_spec, name):
    lines = [json.dumps({"text": f"document {i}"}).encode() if "jsonl" in name else f"line {i}".encode() for i in range(1, 8)]
    lines[4] = lines[4].replace(b"5", b"\xff\xfe5")
    data = b"\n".join(lines) + b"\n"
    src = tmp_path / name
    src.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    _fails(tmp_path, hf_spec, src, r"line 5 is not valid UTF-8")


def test_unreadable_file(tmp_path, hf_spec):
    src = _write_txt(tmp_path / "secret.txt", ["hidden\n"])
    src.chmod(0)
    try:
        try:
            open(src, "rb").close()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod 000 does not stop reads")
        with pytest.raises(CorpusError, match="secret.txt.*not readable"):
            expand_sources([str(src)])
        with pytest.raises(CorpusError, match="secret.txt"):
            tokenize_corpus(hf_spec, [src], tmp_path / "out", workers=1, progress=False)
        _assert_nothing_finished_left(tmp_path / "out")
    finally:
        src.chmod(0o644)


def test_empty_corpus_is_an_error(tmp_path, hf_spec):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n   \n")
    with pytest.raises(CorpusError, match="empty.txt.*no text"):
        tokenize_corpus(hf_spec, [src], tmp_path / "out", workers=1, progress=False)
    _assert_nothing_finished_left(tmp_path / "out")


EDGE_MARKUP = [
    "{{a}}b{{c{{d}}e}}f{{unclosed", "x{{{y}}}z", "{{", "}}{{a}}}", "a{b}{{c}", "",
    "{|\n| cell || cell2\n|-\n! head !! h2\n| style=\"x\" | v\n|}\nafter", "plain [[link|text]], [http://x.org site]",
    "<!-- c -->a<ref name=x>r</ref>b<math>x^2</math>[[Category:X]] [[File:a.png|thumb|cap]]\n[[de:Alpha]]",
]


def test_wiki_markup_filter_equals_gensims():
    from gensim.corpora.wikicorpus import filter_wiki

    from vocabmetric.building.corpus.wikipedia import plain_text as _clean_wiki

    docs = iter_documents(DATA / "enwiki-sample-pages-articles.xml.bz2")
    pages = [next(docs).text for _ in range(25)]
    for markup in pages + EDGE_MARKUP:
        assert _clean_wiki(markup) == filter_wiki(markup)
