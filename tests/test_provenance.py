"""Every token's provenance (trained, borrowed, composed, none) from the store to the tables
and the service: written, read back, derived for stores built before it, shown everywhere.

One real zarr store on tmp holds all four provenances: ids 0..29 trained, 30..34 borrowed
(each the vector of a trained donor), 35..49 composed, 50..59 none. The service tests run a
real uvicorn server on loopback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import serve_in_thread
from vocabmetric import open_store
from vocabmetric.building.embeddings import Embeddings
from vocabmetric.vocab.provenance import COMPOSED, NONE, PROVENANCE
from vocabmetric.errors import StoreError
from vocabmetric.store.integrity import Manifest, write_manifest
from vocabmetric.metrics import KnnMetric
from vocabmetric.store import TruncatedMetric, write_store

VOCAB_SIZE = 60
TRAINED, BORROWED, COMPOSED_IDS, NO_VECTOR = range(0, 30), range(30, 35), range(35, 50), range(50, 60)
EXPECTED = (["trained"] * 30 + ["borrowed"] * 5 + ["composed"] * 15 + ["none"] * 10)


class Tok:
    spec, fingerprint = "tiny:provenance", "tiny-provenance"


def four_provenances(seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(VOCAB_SIZE, 8)).astype(np.float32)
    trained = np.zeros(VOCAB_SIZE, bool)
    trained[TRAINED] = True
    borrowed = np.full(VOCAB_SIZE, -1, np.int32)
    for i in BORROWED:
        borrowed[i] = i - 30  # a trained donor
        vectors[i] = vectors[i - 30]
    composed = np.zeros(VOCAB_SIZE, bool)
    composed[COMPOSED_IDS] = True
    composed[3] = True  # trained wins over composed
    return Embeddings(vectors, trained, borrowed, "word2vec", {"untrained": "compose"}, composed=composed)


def write(path: Path, emb: Embeddings) -> Path:
    knn = KnnMetric(k=6, progress=False).fit(emb.vectors, emb.usable)
    return write_store(path, tokenizer=Tok(), token_bytes=[f" w{i}".encode() for i in range(VOCAB_SIZE)],
                       counts=np.arange(VOCAB_SIZE, dtype=np.int64), embeddings=emb, corpus={"n_tokens": 10},
                       metrics={"knn": TruncatedMetric(knn.indices_, knn.costs_, knn.cap_, knn.params_)})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return write(tmp_path_factory.mktemp("provenance") / "metric.zarr", four_provenances())


@pytest.fixture
def store(store_path):
    return open_store(store_path)


def make_old_layout(path: Path) -> None:
    """What a store built before tokens/provenance looks like: no array, no counts in the
    attributes, and a manifest without them."""
    shutil.rmtree(path / "tokens" / "provenance")
    meta = json.loads((path / "zarr.json").read_text())
    for key in ("provenance", "n_composed"):
        del meta["attributes"]["embeddings"][key]
    (path / "zarr.json").write_text(json.dumps(meta))
    write_manifest(path)


# -- the store ----------------------------------------------------------------------------------
def test_every_provenance_reads_back(store):
    assert PROVENANCE == ("none", "trained", "borrowed", "composed")
    codes = store.provenance
    assert codes.dtype == np.uint8 and codes.shape == (VOCAB_SIZE,)
    assert [PROVENANCE[c] for c in codes] == EXPECTED
    assert [store.provenance_of(i) for i in range(VOCAB_SIZE)] == EXPECTED
    assert store.provenance_of(" w40") == "composed" and store.provenance_of(" w3") == "trained"
    np.testing.assert_array_equal(store.usable, codes != NONE)  # composed tokens are usable
    assert store.usable[list(COMPOSED_IDS)].all() and not store.usable[list(NO_VECTOR)].any()
    with pytest.raises(ValueError):
        store.provenance[0] = 3  # shared with every caller: read-only
    emb = store.info()["embeddings"]
    assert emb["provenance"] == {"none": 10, "trained": 30, "borrowed": 5, "composed": 15}
    assert emb["n_composed"] == 15 and emb["n_trained"] == 30 and emb["n_borrowed"] == 5


def test_metrics_price_composed_tokens_and_cap_the_rest(store):
    cap = store.metric_attrs("l2")["cap"]
    assert store.cost(40, 41, "l2") < cap  # composed: a real distance
    assert store.cost(40, 55, "l2") == cap and store.cost(55, 56, "l2") == cap  # none: the cap
    assert store.neighbors(40, k=3, metric="l2") and store.neighbors(55, k=3, metric="l2") == []
    assert store.faiss_index().ntotal == 50  # trained + borrowed + composed


def test_the_manifest_covers_the_provenance_array(store_path, tmp_path):
    manifest = Manifest.load(store_path)
    assert manifest.arrays["tokens/provenance"]["shape"] == [VOCAB_SIZE]
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(store_path, copy)
    chunk = copy / "tokens" / "provenance" / "c" / "0"  # the one chunk of a (60,) array
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    damaged = open_store(copy)  # sizes match: only the hash tells
    with pytest.raises(StoreError, match="tokens/provenance.*does not match its hash"):
        damaged.provenance


def test_a_store_built_before_provenance_derives_it(tmp_path):
    emb = four_provenances()
    emb.composed = None  # before `compose`: trained, borrowed, none
    path = write(tmp_path / "old.zarr", emb)
    make_old_layout(path)
    old = open_store(path)
    assert "tokens/provenance" not in old.manifest.arrays
    np.testing.assert_array_equal(old.provenance, emb.provenance)
    assert old.provenance_of(32) == "borrowed" and old.provenance_of(40) == "none"
    np.testing.assert_array_equal(old.usable, old.trained | (old.borrowed_from >= 0))
    assert old.info()["embeddings"]["provenance"] == {"none": 25, "trained": 30, "borrowed": 5, "composed": 0}
    assert Manifest.load(path).verify() > 0


def test_a_code_beyond_the_provenances_is_refused_by_name(tmp_path):
    import zarr

    path = write(tmp_path / "bad.zarr", four_provenances())
    codes = zarr.open_array(str(path / "tokens" / "provenance"), mode="r+")
    codes[7] = 9
    write_manifest(path)  # a consistent manifest: the value itself is wrong
    with pytest.raises(StoreError, match=r"tokens/provenance gives token 7 the code 9.*rebuild"):
        open_store(path).provenance


# -- the tables ---------------------------------------------------------------------------------
def test_info_table_counts_each_provenance(store):
    from vocabmetric.query.report import info_table

    line = next(line for line in info_table(store).splitlines() if line.startswith("provenance"))
    assert "30 trained" in line and "5 borrowed" in line and "15 composed" in line and "10 none" in line


def test_neighbor_tables_show_each_rows_provenance(store):
    from vocabmetric.query.report import PROVENANCE_MARK, neighbor_table, side_by_side

    rows = store.neighbors(40, k=6, metric="knn")
    table = neighbor_table(store, 40, rows, "knn").splitlines()
    assert "(id 40, composed)" in table[0]
    assert table[1].split() == ["rank", "id", "token", "cost", "provenance"]
    shown = [line.split() for line in table[3:]]
    assert [(int(r[1]), r[4]) for r in shown] == [(n.id, EXPECTED[n.id]) for n in rows]
    assert {r[4] for r in shown} - {"trained"}, "a composed token's neighbours include untrained tokens"
    assert "(id 55, none): none (the token has no vector" in neighbor_table(store, 55, [], "knn")

    both = side_by_side(store, 40, ["knn", "l2"], k=4).splitlines()
    assert "(id 40, composed)" in both[0] and both[-1].startswith("provenance: t trained")
    marks = [line.split()[3] for line in both[3:-1]]
    assert marks == [PROVENANCE_MARK[EXPECTED[n.id]] for n in store.neighbors(40, k=4, metric="knn")]


def test_cli_neighbors_and_info_show_provenance(store):
    from vocabmetric.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["neighbors", str(store.path), "40", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["provenance"] for r in rows] == [EXPECTED[r["id"]] for r in rows]
    assert {"id", "text", "cost", "provenance"} == set(rows[0])
    table = runner.invoke(app, ["neighbors", str(store.path), " w52"]).stdout
    assert "(id 52, none)" in table
    info = json.loads(runner.invoke(app, ["info", str(store.path), "--json"]).stdout)
    assert info["embeddings"]["provenance"]["composed"] == 15


# -- the service --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(store_path):
    with serve_in_thread(store_path, timeout=30) as base:
        yield base


def test_service_answers_carry_provenance_and_match_the_schema(url, store_path):
    from vocabmetric.query.service._schema import CostResponse, InfoResponse, NeighborsBatchResponse, NeighborsResponse

    got = httpx.get(f"{url}/neighbors", params={"id": 40, "k": 6, "metric": "knn"}).json()
    assert got["query"] == {"id": 40, "text": " w40", "provenance": "composed"}
    assert [n["provenance"] for n in got["neighbors"]] == [EXPECTED[n["id"]] for n in got["neighbors"]]
    NeighborsResponse.model_validate(got, strict=True)
    none = httpx.get(f"{url}/neighbors", params={"token": " w55", "metric": "l2"}).json()
    assert none["query"]["provenance"] == "none" and none["neighbors"] == []

    batch = httpx.post(f"{url}/neighbors", json={"ids": [3, 32, 45], "k": 3}).json()
    NeighborsBatchResponse.model_validate(batch)
    assert [r["query"]["provenance"] for r in batch["results"]] == ["trained", "borrowed", "composed"]
    cost = httpx.get(f"{url}/cost", params={"a": "32", "b": " w57"}).json()
    CostResponse.model_validate(cost)
    assert (cost["a"]["provenance"], cost["b"]["provenance"]) == ("borrowed", "none")
    info = httpx.get(f"{url}/info").json()
    InfoResponse.model_validate(info)
    assert info["embeddings"]["provenance"] == {"none": 10, "trained": 30, "borrowed": 5, "composed": 15}

    wrong = {**got, "query": {**got["query"], "provenance": "guessed"}}
    with pytest.raises(ValueError, match="provenance"):
        NeighborsResponse.model_validate(wrong)  # the schema holds only the four names


def test_openapi_describes_provenance_as_an_enum(url):
    schema = httpx.get(f"{url}/openapi.json").json()
    models = schema["components"]["schemas"]
    for name in ("TokenModel", "NeighborModel"):
        field = models[name]["properties"]["provenance"]
        assert field["enum"] == list(PROVENANCE) and "composed" in field["description"]
        assert "provenance" in models[name]["required"]
    assert "30 trained, 5 borrowed, 15 composed, 10 none" in schema["info"]["description"]
    assert "carries `provenance`" in schema["info"]["description"]


def test_the_service_reads_no_store_per_request(url, store_path):
    """Provenance is indexed from the in-memory array: answers match the store's codes,
    for every token, and stay right when the store's files are gone after startup."""
    store = open_store(store_path)
    array, away = store_path / "tokens" / "provenance", store_path.parent / "provenance-away"
    array.rename(away)
    try:
        answers = httpx.post(f"{url}/neighbors", json={"ids": list(range(VOCAB_SIZE)), "k": 1}).json()["results"]
    finally:
        away.rename(array)
    assert [r["query"]["provenance"] for r in answers] == [PROVENANCE[c] for c in store.provenance]
    assert sum(r["query"]["provenance"] == PROVENANCE[COMPOSED] for r in answers) == 15
