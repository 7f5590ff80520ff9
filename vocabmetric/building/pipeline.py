"""The build pipeline: a validated TOML config, run as cached, resumable stages.

Stages, each cached under ``OUT/cache/<stage>-<key>/`` where ``key`` hashes the stage's
parameters and the content digests of the stage outputs it reads (:mod:`vocabmetric.building.stages`)::

    tokenize  → corpus.txt (gensim corpus_file format), counts.npy, stats.json
    embed     → vectors.npy, trained.npy, borrowed_from.npy (composed.npy under compose), meta.json
    metrics   → one cache entry per metric (and one for the shared kNN graph, one for the 2-D map)
    store     → OUT/metric.zarr

A stage writes into a temporary directory and renames it into place when done
(:mod:`vocabmetric.building.stages`), so a killed run never leaves a cache entry that looks
finished; rerunning resumes at the first unfinished stage, and a run with nothing changed
does no work. ``force=True`` rebuilds. What dead runs left (temporary stage directories,
the store's temporary copy) is removed at the start of the next build.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._util.progress import show_progress
from .checkpoint import checkpoint_files
from .._util.gguf import resolve_source
from .corpus import expand_sources, tokenize_corpus
from .compose import compose_untrained
from .embeddings import Embeddings, apply_untrained_policy, import_embeddings, train_word2vec
from ..errors import ConfigError, CorpusError, VocabMetricError
from .metrics_stage import build_metrics, check_neighbour_counts, validate_metrics, with_embedding_defaults
from .stages import StageResult, Stages, save_array, stage_key
from ..store import open_store, write_store
from ..vocab.tokenizer import SPEC_FORMS, TOKENIZER_KINDS, load_tokenizer

LOG = logging.getLogger(__name__)

#: The tokenizer kinds a spec names (``kind:rest``).
#: The store's ``corpus`` attributes of a build without a [corpus] (embeddings imported).
NO_CORPUS = {"absent": True, "sources": [], "n_documents": 0, "n_tokens": 0, "seconds": 0.0,
             "tokens_per_second": 0.0, "note": "no [corpus]: token counts are absent (tokens/count is all zero)"}


# -- config -------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizerConfig(_Section):
    spec: str = Field(description="'tiktoken:<encoding>', 'hf:<path/to/tokenizer.json>', 'hf:<model directory>' or "
                                  "'gguf:<file.gguf>' (a path may be 'pkg:<package>/<file>')")


class CorpusConfig(_Section):
    sources: list[str] = Field(min_length=1, description="files, globs, Parquet shard or datasets directories, relative to the config file")
    text_field: str = "text"
    workers: int = Field(0, ge=0, description="tokenizer processes; 0 = all cores")
    batch_chars: int = Field(1_000_000, gt=0)


class EmbeddingsConfig(_Section):
    method: Literal["word2vec", "import"] = "word2vec"
    dim: int = Field(128, gt=0)
    window: int = Field(5, gt=0)
    sg: Literal[0, 1] = 1
    negative: int = Field(10, ge=0)
    epochs: int = Field(5, gt=0)
    sample: float = Field(1e-4, ge=0)
    alpha: float = Field(0.025, gt=0)
    min_count: int = Field(5, ge=1)
    workers: int = Field(0, ge=0, description="word2vec threads; 0 = all cores")
    seed: int = Field(0, ge=0)
    deterministic: bool = Field(False, description="byte-identical builds: word2vec on one thread (slower)")
    untrained: Literal["isolate", "borrow", "compose"] = "isolate"
    compose: Literal["merges", "fasttext"] = Field("merges", description="untrained = 'compose': from the "
                                                   "tokenizer's merges, or FastText n-grams over the token texts")
    path: Optional[str] = Field(None, description="method = 'import': a model directory, a .safetensors, .npy or "
                                ".gguf file ('pkg:<package>/<file>': a file inside an installed package)")
    matrix: Literal["input", "output"] = Field("input", description="method = 'import': token embeddings or the LM head")
    tensor: Optional[str] = Field(None, description="method = 'import': the tensor name, overriding `matrix`")


class ReportConfig(_Section):
    probes: list[str] = Field(default_factory=list, description="tokens whose neighbours the build report shows")
    k: int = Field(8, gt=0)


class ProjectionConfig(_Section):
    """The 2-D map of the usable tokens (UMAP, 2 components, on the shared kNN graph), stored
    as ``projection2d``; built whenever a metric is configured, unless ``enabled = false``."""

    enabled: bool = True
    n_neighbors: int = Field(15, ge=2)
    n_epochs: Optional[int] = Field(None, gt=0, description="UMAP epochs; default: 200, fewer for small vocabularies")
    seed: int = Field(0, ge=0)


class PipelineConfig(_Section):
    tokenizer: TokenizerConfig
    corpus: Optional[CorpusConfig] = Field(None, description="optional with embeddings.method = 'import'")
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def load_config(path: str | os.PathLike) -> tuple[PipelineConfig, Path]:
    """Read and validate a pipeline TOML; return the config and the directory paths are relative to.

    Every problem is one :class:`ConfigError` naming the file and the key, raised before any
    work starts: unknown keys, wrong types, missing corpus files, unknown metrics.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {_explain(e)}" for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"{path}: {problems}") from None
    base = path.resolve().parent
    _check_config(config, base, path)
    return config, base


def _explain(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling against docs/building.md)"
    if error["type"] == "missing":
        return "required key is missing"
    return f"{error['msg']} (got {error.get('input')!r})"


def _check_config(config: PipelineConfig, base: Path, path: Path) -> None:
    if config.corpus is not None:
        try:
            expand_sources(config.corpus.sources, base)
        except CorpusError as exc:
            raise ConfigError(f"{path}: corpus.sources: {exc}") from None
    elif config.embeddings.method != "import":
        raise ConfigError(f"{path}: corpus: required key is missing ([corpus] sources = [...]); "
                          "only embeddings.method = 'import' builds without a corpus")
    spec = config.tokenizer.spec
    kind, sep, rest = spec.partition(":")
    if kind not in TOKENIZER_KINDS or not sep or not rest:
        near = [k for k in TOKENIZER_KINDS if kind[:1].lower() == k[0]] or difflib.get_close_matches(kind, TOKENIZER_KINDS, n=1)
        hint = f"; did you mean '{near[0]}:{rest}'?" if near and sep else ""
        raise ConfigError(f"{path}: tokenizer.spec: {spec!r} is not one of {SPEC_FORMS}{hint}")
    if spec.startswith("hf:"):
        where = _resolve(spec[3:], base)
        if not where.exists():
            raise ConfigError(f"{path}: tokenizer.spec: file {where} does not exist")
        if where.is_dir() and not (where / "tokenizer.json").is_file():
            raise ConfigError(f"{path}: tokenizer.spec: model directory {where} has no tokenizer.json; "
                              "save the fast tokenizer there or give the file's path")
    if spec.startswith("gguf:"):
        where = _resolve(spec[5:], base, f"{path}: tokenizer.spec")
        if not where.is_file():
            raise ConfigError(f"{path}: tokenizer.spec: GGUF file {where} does not exist; give a model's .gguf file "
                              "(relative to the config file) or 'gguf:pkg:<package>/<file>'")
    if config.embeddings.method == "import":
        if not config.embeddings.path:
            raise ConfigError(f"{path}: embeddings.path is required when embeddings.method = 'import'")
        where = _resolve(config.embeddings.path, base, f"{path}: embeddings.path")
        if not where.exists():
            raise ConfigError(f"{path}: embeddings.path: file {where} does not exist")
    if config.embeddings.untrained == "compose" and config.embeddings.compose == "fasttext" and config.corpus is None:
        raise ConfigError(f"{path}: embeddings.compose = 'fasttext' trains on the corpus and needs a [corpus]; "
                          "use embeddings.compose = 'merges' with imported embeddings")
    if config.embeddings.deterministic and config.embeddings.workers > 1:
        raise ConfigError(f"{path}: embeddings.deterministic = true trains on one thread; remove "
                          f"embeddings.workers = {config.embeddings.workers} or set it to 1")
    try:
        config.metrics = with_embedding_defaults(config.metrics, config.embeddings.method)
        validate_metrics(config.metrics)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _resolve(p: str, base: Path, where: str = "") -> Path:
    """``p`` relative to the config's folder ``base``; ``pkg:<package>/<file>`` inside an installed package."""
    try:
        return resolve_source(p, base)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def tokenizer_spec(config: PipelineConfig, base: Path) -> str:
    spec = config.tokenizer.spec
    if spec.startswith("gguf:") and not spec.startswith("gguf:pkg:"):  # a pkg: spec stays portable in the store
        return f"gguf:{_resolve(spec[5:], base)}"
    return f"hf:{_resolve(spec[3:], base)}" if spec.startswith("hf:") else spec


def _source_ids(sources: list[Path]) -> list[list]:
    """Identify inputs by path, size and modification time (content hashing a 10 GB corpus is slow)."""
    return [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in sources]


@dataclass
class BuildResult:
    store_path: Path
    stages: list[StageResult]
    stats: dict
    config: PipelineConfig


def build(
    config_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
) -> BuildResult:
    """Run the pipeline of ``config_path`` into ``out`` (default: ``runs/<config name>``).

    Returns the store path, what each stage did and the corpus/embedding stats.
    """
    config, base = load_config(config_path)
    out = Path(out) if out else Path("runs") / Path(config_path).stem
    show = show_progress(progress)
    spec = tokenizer_spec(config, base)
    try:
        tokenizer = load_tokenizer(spec)
    except VocabMetricError as exc:
        raise type(exc)(f"{config_path}: tokenizer.spec: {exc}") from None  # the file: key: prefix of every config error
    try:
        check_neighbour_counts(config.metrics, config.projection.model_dump(), _tokens_with_text(tokenizer),
                               config.tokenizer.spec)
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    make_build_directory(out)
    stages = Stages(out, force)
    stages.remove_leftovers()  # of builds killed earlier
    sources = expand_sources(config.corpus.sources, base) if config.corpus else []
    cc, ec = config.corpus, config.embeddings

    # 1. tokenize (none without a [corpus]: imported embeddings, counts absent)
    tok_key = stage_key("tokenize", [tokenizer.fingerprint, _source_ids(sources), cc.text_field if cc else None])

    def tokenize(tmp: Path) -> None:
        stats = tokenize_corpus(spec, sources, tmp, text_field=cc.text_field, workers=cc.workers or None,
                                batch_chars=cc.batch_chars, progress=show, vocab_size=tokenizer.vocab_size)
        save_array(tmp / "counts.npy", stats.counts)
        (tmp / "stats.json").write_text(json.dumps({
            "sources": [str(s) for s in sources], "n_documents": stats.n_documents, "n_tokens": stats.n_tokens,
            "seconds": stats.seconds, "tokens_per_second": stats.tokens_per_second,
        }))

    if cc is None:
        counts, corpus_stats = np.zeros(tokenizer.vocab_size, np.int64), dict(NO_CORPUS)
        LOG.info("no [corpus]: token counts are absent (all zero in the store)")
    else:
        tok_dir = stages.run("tokenize", tok_key, tokenize, content=("corpus.txt", "counts.npy"))
        counts = np.load(tok_dir / "counts.npy")
        corpus_stats = json.loads((tok_dir / "stats.json").read_text())

    # 2. embed
    emb_params = ec.model_dump()
    composing = ec.untrained == "compose"
    if not composing:  # keeps the keys of builds from before `compose` existed
        emb_params.pop("compose")
    if ec.method == "import":  # a re-saved checkpoint at the same path is a new input
        emb_params["checkpoint"] = _source_ids(checkpoint_files(_resolve(ec.path, base)))
    emb_key = stage_key("embed", emb_params, stages.digest("tokenize") if cc else tok_key)

    def embed(tmp: Path) -> None:
        if ec.method == "import":
            emb = import_embeddings(_resolve(ec.path, base), tokenizer.vocab_size, tensor=ec.tensor, matrix=ec.matrix)
        else:
            emb = train_word2vec(tok_dir / "corpus.txt", counts, dim=ec.dim, window=ec.window, sg=ec.sg,
                                 negative=ec.negative, epochs=ec.epochs, sample=ec.sample, min_count=ec.min_count,
                                 workers=ec.workers or None, seed=ec.seed, alpha=ec.alpha,
                                 deterministic=ec.deterministic)
        if composing:
            emb = compose_untrained(emb, tokenizer, method=ec.compose, corpus_file=tok_dir / "corpus.txt" if cc else None,
                                    counts=counts if cc else None, fasttext_params=_fasttext_params(ec))
            save_array(tmp / "composed.npy", emb.composed)
        else:
            emb = apply_untrained_policy(emb, [tokenizer.token_text(i) for i in range(tokenizer.vocab_size)], counts,
                                         ec.untrained)
        save_array(tmp / "vectors.npy", emb.vectors)
        save_array(tmp / "trained.npy", emb.trained)
        save_array(tmp / "borrowed_from.npy", emb.borrowed_from)
        (tmp / "meta.json").write_text(json.dumps({"method": emb.method, "params": emb.params, "seconds": emb.seconds}))

    emb_files = ("vectors.npy", "trained.npy", "borrowed_from.npy") + (("composed.npy",) if composing else ())
    emb_dir = stages.run("embed", emb_key, embed, content=emb_files)
    meta = json.loads((emb_dir / "meta.json").read_text())
    emb = Embeddings(np.load(emb_dir / "vectors.npy"), np.load(emb_dir / "trained.npy"),
                     np.load(emb_dir / "borrowed_from.npy"), meta["method"], meta["params"], meta["seconds"],
                     np.load(emb_dir / "composed.npy") if composing else None)

    # 3. metrics
    metrics, tree, extra = build_metrics(config.metrics, emb, stages, stages.digest("embed"), progress=show,
                                         projection=config.projection.model_dump())

    # 4. store
    store_key = stage_key("store", [[r.key, r.digest] for r in stages.results])
    store_path = out / "metric.zarr"
    store_stage = _store_is_current(store_path, store_key) and not force
    start = time.perf_counter()
    if not store_stage:
        write_store(store_path, tokenizer=tokenizer, token_bytes=tokenizer.token_bytes_array(), counts=counts,
                    embeddings=emb, corpus={**corpus_stats, "build_key": store_key}, metrics=metrics, tree=tree,
                    extra_arrays=extra)
    stages.results.append(StageResult("store", store_key, store_path, store_stage, time.perf_counter() - start))
    stats = {"vocab_size": tokenizer.vocab_size, "n_tokens": corpus_stats["n_tokens"],
             "n_documents": corpus_stats["n_documents"], "n_trained": int(emb.trained.sum()),
             "n_borrowed": int((emb.borrowed_from >= 0).sum()),
             "n_composed": int(emb.composed.sum()) if emb.composed is not None else 0,
             "tokens_per_second": corpus_stats["tokens_per_second"], "corpus_absent": cc is None}
    return BuildResult(store_path, stages.results, stats, config)


def make_build_directory(out: Path) -> None:
    """Create the build directory ``out`` (and its parents); a :class:`ConfigError` in one
    line when it is a file or cannot be written, before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a directory; give a build directory (it is created)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the build directory ({exc.strerror or exc}); "
                          "give a directory you can write") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the build directory is not writable; give a directory you can write")


def _tokens_with_text(tokenizer: Any) -> int:
    """The ids that have a text and are not special: the most tokens a metric can place."""
    special = tokenizer.special_ids
    return sum(1 for i, b in enumerate(tokenizer.token_bytes_array()) if b and i not in special)


def _fasttext_params(ec: EmbeddingsConfig) -> dict:
    """The corpus model's training parameters, for FastText under ``compose = 'fasttext'``."""
    workers = 1 if ec.deterministic else ec.workers or os.cpu_count() or 1
    return dict(dim=ec.dim, window=ec.window, sg=ec.sg, negative=ec.negative, epochs=ec.epochs, sample=ec.sample,
                min_count=ec.min_count, workers=workers, seed=ec.seed, alpha=ec.alpha)


def _store_is_current(path: Path, key: str) -> bool:
    try:
        return open_store(path).attrs.get("corpus", {}).get("build_key") == key
    except VocabMetricError:
        return False
