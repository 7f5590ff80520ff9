"""Wikipedia ``pages-articles`` dumps: every piece of their handling in one place.

- :func:`articles` streams the raw markup of each article (namespace 0, not a redirect) of a
  ``.xml.bz2`` dump; a truncated or malformed dump is a :class:`CorpusError` naming the file
  and the page;
- :func:`plain_text` strips the markup exactly as gensim's ``filter_wiki`` does, faster; it
  runs in the tokenizing workers, so the reading process never imports gensim;
- :func:`load_filters` imports gensim's patterns once, before the workers fork.

Cost: one page in memory at a time; :func:`plain_text` is O(len(markup)) per pass, at most
three passes.
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path
from typing import Iterator
from xml.etree.ElementTree import ParseError

from ...errors import CorpusError

SUFFIX = ".xml.bz2"


def articles(path: Path) -> Iterator[str]:
    """The raw markup of each article of the dump at ``path``; errors name the file and page."""
    page = 0
    try:
        with bz2.open(path, "rb") as fh:
            for page, text in enumerate(articles_in(fh), 1):
                yield text
    except (EOFError, OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot read after page {page}: {exc} (is the file truncated or corrupt?)") from exc
    except ParseError as exc:
        raise CorpusError(f"{path}: cannot parse after page {page}: {exc} (is the dump truncated or corrupt?)") from exc


def load_filters() -> None:
    """Import gensim's wiki patterns here, so that worker processes forked later inherit them."""
    import gensim.corpora.wikicorpus  # noqa: F401


def articles_in(fh) -> Iterator[str]:
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


def plain_text(markup: str) -> str:
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
