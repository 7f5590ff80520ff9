"""Shared fixtures: a small real store built by the real pipeline.

``small_store`` trains a byte-level BPE tokenizer (HF ``tokenizers``) on the Lee corpus in
``data/``, runs the whole pipeline (tokenize → word2vec → knn, geodesic, umap, tree) and
opens the store. Built once per test session (about 20 s on 2 cores).
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
LEE = DATA / "lee_background.txt.gz"


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Every test starts from the same global torch and NumPy RNG state: a test's random
    inputs do not depend on which tests ran before it, so a failure reproduces. ``VOCABMETRIC_TEST_SEED`` picks another state."""
    seed = int(os.environ.get("VOCABMETRIC_TEST_SEED", "0"))
    torch.manual_seed(seed)
    np.random.seed(seed)


def lee_texts() -> list[str]:
    with gzip.open(LEE, "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def train_bpe(path: Path, vocab_size: int = 1000, texts: list[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (default: the Lee corpus) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or lee_texts(), trainer)
    tok.save(str(path))
    return path


SMALL_CONFIG = """
[tokenizer]
spec = "hf:tokenizer.json"

[corpus]
sources = ["{lee}"]

[embeddings]
dim = 32
epochs = 10
min_count = 3
workers = 2
seed = 1

[metrics.knn]
k = 16

[metrics.geodesic]
k_graph = 5
k = 32

[metrics.umap]
n_components = 2
k = 8
n_neighbors = 8
n_epochs = 50

[metrics.tree]
branching = 4
max_leaf_size = 8
"""


def fast_tokenizer(path: Path):
    """A transformers fast tokenizer over a ``tokenizers`` JSON file (eos = pad = <|endoftext|>)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(tokenizer, vocab_size: int | None = None, seed: int = 0):
    """A one-layer Llama built from a config (random weights: nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def small_build(tmp_path_factory):
    """``(config_path, BuildResult)`` of the small pipeline (built once per session)."""
    from vocabmetric.building.pipeline import build

    root = tmp_path_factory.mktemp("small-build")
    train_bpe(root / "tokenizer.json")
    config = root / "small.toml"
    config.write_text(SMALL_CONFIG.format(lee=LEE.as_posix()))
    return config, build(config, root / "out", progress=False)


@pytest.fixture(scope="session")
def small_store(small_build):
    """The small pipeline's store, opened (read-only; do not modify it in a test)."""
    from vocabmetric import open_store

    return open_store(small_build[1].store_path)


def moved_mass(vocab_size: int, a: int, targets, mass: float = 0.3):
    """``(logits (n, V), ref (n, V))`` float64: a reference peaked on token ``a`` (logit 8) and,
    for each target, the same distribution with ``mass`` moved from ``a`` to that target."""
    import torch

    ref_logits = torch.zeros(vocab_size, dtype=torch.float64)
    ref_logits[a] = 8.0
    q = torch.softmax(ref_logits, -1)
    moved = []
    for target in targets:
        p = q.clone()
        p[a] -= mass
        p[target] += mass
        moved.append(p.log())
    return torch.stack(moved), ref_logits.expand(len(moved), vocab_size)


# -- servers on loopback -------------------------------------------------------------------
VOCABMETRIC = Path(sys.executable).with_name("vocabmetric")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive, log=lambda: "", timeout: float = 60) -> None:
    """Poll ``url``/healthz until it answers 200; fail with the server's log if it dies or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            pytest.fail(f"the server at {url} exited before answering:\n{log()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server at {url} did not answer /healthz within {timeout:g} s:\n{log()[-3000:]}")
        time.sleep(0.1)


@contextmanager
def serve_subprocess(store_path: Path, log_path: Path, *args: str, timeout: float = 60):
    """A real ``vocabmetric serve`` process on a free loopback port; yields its URL."""
    port = free_port()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([str(VOCABMETRIC), "serve", str(store_path), "--port", str(port), *args],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, lambda: proc.poll() is None, lambda: log_path.read_text(), timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve_in_thread(store_path: Path, timeout: float = 60):
    """The service app under uvicorn in a daemon thread on a free loopback port; yields its URL."""
    import uvicorn

    from vocabmetric.query.service import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store_path), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, thread.is_alive, timeout=timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def small_store_url(small_store, tmp_path_factory):
    """``vocabmetric serve`` on the small store, shared by the service and explorer tests."""
    with serve_subprocess(small_store.path, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url
