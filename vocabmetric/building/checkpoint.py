"""One embedding matrix out of a model checkpoint, read by row slices, without torch.

Sources:

* a model directory as ``save_pretrained`` writes it (or a hub-cache snapshot):
  ``config.json``, ``*.safetensors`` and, when sharded, ``model.safetensors.index.json``;
* one ``.safetensors`` file;
* one ``.npy`` file;
* one ``.gguf`` file (llama.cpp's format, block-quantized): :mod:`vocabmetric._util.gguf`
  reads ``token_embd.weight`` / ``output.weight`` and dequantizes them as the ``gguf``
  package does, with the same memory bound.

``matrix = "input"`` picks the token-embedding tensor (``embed_tokens`` / ``wte`` /
``word_embeddings`` / ``embed_in`` / ``tok_embeddings``); ``matrix = "output"`` the LM head
(``lm_head`` / ``embed_out``), or, when ``config.json`` ties the two
(``tie_word_embeddings``), the input matrix, which is logged and recorded as ``tied``.
``tensor`` names the tensor outright.

Only that tensor is read. A safetensors file is an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}}`` and the raw little-endian data; the header is
parsed here (``safe_open(framework="numpy")`` cannot return bf16) and the tensor's byte range
is read ``slice_bytes`` at a time into the float32 result:

* BF16 → float32: the 16 bits shifted into the high half of a uint32 (exact);
* F16 → float32 by a cast (exact); F32 as is; F64 rounded to float32.

Rows past ``vocab_size`` (a head padded to a multiple of 64 or 128) are never read; their
number is returned as ``dropped_rows``. Peak memory: ``vocab_size·d·4`` bytes plus one slice,
however large the shard. Cost: one sequential read of ``vocab_size·d·itemsize`` bytes.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._util.vectors import require_finite_rows
from ..errors import ConfigError

LOG = logging.getLogger(__name__)

#: Tensor-name endings of the input (token) embedding matrix and of the output (LM head) one.
INPUT_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
               "tok_embeddings.weight")
OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")
#: safetensors dtype → the little-endian numpy dtype its bytes are read as.
RAW_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
INDEX_FILE = "model.safetensors.index.json"
#: Bytes read per slice: the memory the read needs on top of the float32 result.
SLICE_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file[offset : offset + rows·cols·itemsize]``."""

    file: Path
    name: str
    dtype: str  # a safetensors dtype code: BF16, F16, F32, F64, I64 …
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in ``file``


@dataclass
class CheckpointMatrix:
    """The first ``vocab_size`` rows of the chosen tensor, as float32, and where they came from."""

    vectors: np.ndarray  # (vocab_size, d) float32
    tensor: str
    file: Path
    matrix: str  # "input" or "output"
    tied: bool  # matrix = "output" answered by the input matrix (config.json ties them)
    dtype: str
    rows: int  # rows in the checkpoint
    dropped_rows: int  # rows past vocab_size, not read


def safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, from its header alone (no data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            size = path.stat().st_size
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(fh.read(header_len))
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as safetensors: {exc} (is the file truncated or corrupt?)") from exc
    start = 8 + header_len
    entries = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = spec["data_offsets"]
            entry = TensorEntry(path, name, spec["dtype"], tuple(int(s) for s in spec["shape"]), start + int(begin))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: the header entry of tensor {name!r} is malformed ({exc})") from None
        if start + int(end) > size:
            raise ConfigError(f"{path}: tensor {name!r} runs past the end of the file (is it truncated?)")
        entries[name] = entry
    return entries


def npy_entry(path: Path) -> TensorEntry:
    """The one array of a ``.npy`` file as a :class:`TensorEntry` (named ``"array"``)."""
    codes = {np.dtype("<f2"): "F16", np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise ConfigError(f"embeddings file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as a .npy file: {exc}") from exc
    if fortran or dtype not in codes:
        raise ConfigError(f"{path}: a {'Fortran-ordered ' if fortran else ''}{dtype} array; "
                          "save a C-ordered float16/32/64 matrix (np.save(path, np.ascontiguousarray(m)))")
    return TensorEntry(Path(path), "array", codes[dtype], tuple(shape), offset)


def checkpoint_tensors(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Every tensor of a model directory or ``.safetensors`` file, and its ``config.json`` (or ``{}``).

    A directory with ``model.safetensors.index.json`` reads the shards its ``weight_map``
    names (each must exist); without one, every ``*.safetensors`` file in it.
    """
    path = Path(path)
    if path.is_file():
        config_path = path.with_name("config.json")
        return safetensors_header(path), _read_json(config_path) if config_path.is_file() else {}
    if not path.is_dir():
        raise ConfigError(f"embeddings.path {path} does not exist; give a model directory, a .safetensors or a .npy file")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index} has no 'weight_map'; re-save the model with save_pretrained")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ConfigError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}; "
                              "download the missing files (or the whole snapshot) again")
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
            raise ConfigError(f"model directory {path} holds no *.safetensors file (it has: {found}); "
                              "convert the checkpoint with save_pretrained(..., safe_serialization=True) "
                              "or point embeddings.path at a .safetensors or .npy file")
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        tensors.update(safetensors_header(path / shard))
    return tensors, config


def checkpoint_files(path: Path) -> list[Path]:
    """The files an import reads from ``path`` (for cache keys): the file itself, or a model
    directory's ``*.safetensors``, index and ``config.json``."""
    path = Path(path)
    if not path.is_dir():
        return [path] if path.exists() else []
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name in (INDEX_FILE, "config.json"))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as JSON: {exc}") from exc
    return obj if isinstance(obj, dict) else {}


def ties_embeddings(config: dict) -> bool | None:
    """``tie_word_embeddings`` of a ``config.json`` (or of its ``text_config``); None if unsaid."""
    for section in (config, config.get("text_config") or {}):
        if isinstance(section, dict) and "tie_word_embeddings" in section:
            return bool(section["tie_word_embeddings"])
    return None


def choose_tensor(tensors: dict[str, TensorEntry], source: Path, *, matrix: str = "input",
                  tensor: str | None = None, config: dict | None = None) -> tuple[TensorEntry, bool]:
    """The tensor holding ``matrix``, and whether it is the input matrix standing in for a tied head."""
    names = sorted(tensors)
    listing = ", ".join(names[:20]) + (f" … ({len(names)} tensors)" if len(names) > 20 else "")
    if tensor is not None:
        if tensor not in tensors:
            raise ConfigError(f"{source} has no tensor {tensor!r}; it has: {listing}")
        return tensors[tensor], False
    if matrix not in ("input", "output"):
        raise ConfigError(f"embeddings.matrix = {matrix!r}; use 'input' or 'output'")

    def candidates(endings: tuple[str, ...]) -> list[str]:
        return [n for n in names if len(tensors[n].shape) == 2
                and any(n == e or n.endswith("." + e) for e in endings)]

    tie = ties_embeddings(config or {})
    tied = False
    found = candidates(OUTPUT_NAMES) if matrix == "output" and tie is not True else []
    if matrix == "output" and not found:
        if tie is False:
            raise ConfigError(f"{source}: config.json does not tie the embeddings (tie_word_embeddings = false) "
                              f"but no LM head tensor ({', '.join(OUTPUT_NAMES)}) is there; set embeddings.tensor; "
                              f"it has: {listing}")
        if tie is None and not config:
            raise ConfigError(f"{source}: no LM head tensor ({', '.join(OUTPUT_NAMES)}) and no config.json saying "
                              f"the head is tied; set embeddings.tensor (or matrix = 'input'); it has: {listing}")
        tied = True
    if not found:
        found = candidates(INPUT_NAMES)
    if len(found) != 1:
        what = "several candidate tensors: " + ", ".join(found) if found else "no tensor named like an embedding matrix"
        side = "the LM head" if matrix == "output" and not tied else "the input embeddings"
        raise ConfigError(f"{source}: {what}; say which tensor holds {side} (embeddings.tensor); it has: {listing}")
    if tied:
        LOG.info("%s: the LM head is tied to the input embeddings (tie_word_embeddings); using %s", source, found[0])
    return tensors[found[0]], tied


def read_rows(entry: TensorEntry, rows: int, *, slice_bytes: int = SLICE_BYTES) -> np.ndarray:
    """The first ``rows`` rows of a 2-D tensor as a new (rows, d) float32 array, read slice by slice.

    Every slice is checked for NaN and inf: the error names the first bad row.
    """
    if entry.dtype not in RAW_DTYPES:
        raise ConfigError(f"{entry.file}: tensor {entry.name!r} is {entry.dtype}; "
                          f"import a floating-point matrix ({', '.join(RAW_DTYPES)})")
    raw = RAW_DTYPES[entry.dtype]
    dim = entry.shape[1]
    out = np.empty((rows, dim), dtype=np.float32)
    step = max(1, slice_bytes // max(1, dim * raw.itemsize))
    buf = np.empty(min(step, rows) * dim, dtype=raw)
    with open(entry.file, "rb") as fh:
        fh.seek(entry.offset)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            part = buf[: (hi - lo) * dim].reshape(hi - lo, dim)
            if fh.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise ConfigError(f"{entry.file}: tensor {entry.name!r} ends early (is the file truncated?)")
            if entry.dtype == "BF16":  # bf16 is the high half of a float32: widen and shift in one pass
                np.left_shift(part, 16, out=out[lo:hi].view(np.uint32), dtype=np.uint32)
            else:
                out[lo:hi] = part
            require_finite_rows(out[lo:hi], lo, f"{entry.file}: tensor {entry.name!r}",
                                "the checkpoint is damaged or was saved mid-divergence: use another one")
    return out


def load_matrix(path: Path, vocab_size: int, *, matrix: str = "input", tensor: str | None = None,
                slice_bytes: int = SLICE_BYTES) -> CheckpointMatrix:
    """Find and read the ``(vocab_size, d)`` float32 embedding matrix of ``path`` (see the module doc).

    Fewer rows than ``vocab_size`` is a :class:`ConfigError` naming both numbers.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        from .._util.gguf import load_gguf_matrix

        vectors, entry = load_gguf_matrix(path, vocab_size, matrix=matrix, tensor=tensor)
        rows = entry.shape[0]  # the dtype recorded is the ggml type name (Q8_0, F16 …)
        return CheckpointMatrix(vectors, entry.name, path, matrix, False, entry.qtype.name, rows, rows - vocab_size)
    if path.is_file() and path.suffix == ".npy":
        entry, tied = npy_entry(path), False
    elif path.is_dir() or path.suffix == ".safetensors":
        tensors, config = checkpoint_tensors(path)
        entry, tied = choose_tensor(tensors, path, matrix=matrix, tensor=tensor, config=config)
    elif not path.exists():
        raise ConfigError(f"embeddings file {path} does not exist")
    else:
        raise ConfigError(f"embeddings file {path}: use a model directory, a .safetensors, .npy or .gguf file")
    if len(entry.shape) != 2:
        raise ConfigError(f"embeddings in {path} (tensor {entry.name!r}) have shape {entry.shape}; expected (rows, dim)")
    rows = entry.shape[0]
    if rows < vocab_size:
        raise ConfigError(f"embeddings in {path} (tensor {entry.name!r} in {entry.file.name}) have {rows} rows but "
                          f"the tokenizer has {vocab_size} ids; this matrix belongs to another tokenizer")
    vectors = read_rows(entry, vocab_size, slice_bytes=slice_bytes)
    if rows > vocab_size:
        LOG.info("%s: dropped %d rows past the tokenizer's %d ids (%s has %d)", path, rows - vocab_size, vocab_size,
                 entry.name, rows)
    return CheckpointMatrix(vectors, entry.name, entry.file, matrix, tied, entry.dtype, rows, rows - vocab_size)
