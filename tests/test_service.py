"""The ground-cost service over real HTTP on loopback.

A real ``vocabmetric serve`` process serves the ``small_store`` fixture's store on a free
port; every endpoint is compared with the Python API on the same store, every bad-input
path must be a 4xx with a JSON error body naming the bad value, and a burst of concurrent
requests must all come back right.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import free_port, serve_in_thread, serve_subprocess
from vocabmetric.errors import ConfigError, StoreError, TokenizerError, TokenNotFound, VocabMetricError
from vocabmetric.query.service import MAX_BATCH, MAX_K, MAX_PAIRS, Client
from vocabmetric.store import Neighbor

@pytest.fixture(scope="module")
def base_url(small_store_url):
    return small_store_url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(base_url):
    with Client(base_url) as c:
        yield c


@pytest.fixture(scope="module")
def probes(small_store):
    """Trained ids whose text names exactly one id (so text and id queries agree)."""
    s = small_store
    out = []
    for i in np.flatnonzero(s.usable):
        text = s.token_text(i)
        try:
            if s.resolve(text) == i and text.startswith(" ") and len(text) > 3:
                out.append(int(i))
        except VocabMetricError:
            continue
        if len(out) == 6:
            break
    assert len(out) == 6
    return out


def _as_neighbors(body: dict) -> list[Neighbor]:
    return [Neighbor(n["id"], n["text"], n["cost"]) for n in body["neighbors"]]


def _error(response: httpx.Response) -> tuple[str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]["type"], body["error"]["message"]


def assert_error_names(response: httpx.Response, status: int, type_: str, words: list[str]) -> None:
    """The response is the JSON error ``type_`` with ``status``, its message naming ``words``."""
    assert response.status_code == status
    got_type, message = _error(response)
    assert got_type == type_
    for word in words:
        assert word in message, (word, message)


# -- service endpoints --------------------------------------------------------------------
def test_healthz_and_info_describe_the_store(http, small_store):
    health = http.get("/healthz").json()
    assert health == {"status": "ok", "vocab_size": small_store.vocab_size, "fingerprint": small_store.fingerprint}
    info = http.get("/info").json()
    api = small_store.info()
    assert info["vocab_size"] == small_store.vocab_size
    assert info["tokenizer"] == {**api["tokenizer"], "spec": "hf:tokenizer.json"}  # relative to the build directory
    assert info["corpus"]["sources"] == ["lee_background.txt.gz"]  # outside it: the file's name
    assert api["corpus"]["sources"][0].startswith("/")  # (the store itself keeps the absolute path)
    strings = []
    json.loads(json.dumps(info), object_hook=lambda d: strings.extend(v for v in d.values() if isinstance(v, str)) or d)
    assert not [v for v in strings if v.startswith("/") or ":/" in v], strings  # no absolute server path at all
    assert set(info["metrics"]) == set(small_store.metrics) == {"l2", "knn", "geodesic", "umap", "tree"}
    for m in small_store.metrics:
        assert info["metrics"][m]["cap"] == pytest.approx(api["metrics"][m]["cap"])
    assert info["limits"]["max_k"] == MAX_K
    assert str(small_store.path) not in json.dumps(info)  # the server's filesystem layout stays private


def test_every_response_carries_a_server_timing(http):
    for response in (http.get("/neighbors", params={"id": 5, "metric": "knn"}), http.get("/nowhere"), http.post("/cost", json={})):
        parts = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
        app_ms, cpu_ms = float(parts["app"]), float(parts["cpu"])
        assert 0 < app_ms < 10_000 and 0 <= cpu_ms <= app_ms + 0.1  # one thread's CPU time cannot exceed wall time


def test_openapi_schema_lists_every_endpoint(http):
    schema = http.get("/openapi.json").json()
    assert {"/healthz", "/info", "/neighbors", "/cost"} <= set(schema["paths"])
    assert {"get", "post"} <= set(schema["paths"]["/neighbors"]) and {"get", "post"} <= set(schema["paths"]["/cost"])
    assert "NeighborsResponse" in schema["components"]["schemas"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("metric", ["knn", "geodesic", "umap", "l2", "tree"])
def test_get_neighbors_by_id_and_by_text_equal_the_api(http, small_store, probes, metric):
    for i in probes[:3]:
        expected = small_store.neighbors(i, k=7, metric=metric)
        assert expected, f"token {i} has no {metric} neighbours"
        by_id = http.get("/neighbors", params={"id": i, "k": 7, "metric": metric}).json()
        by_text = http.get("/neighbors", params={"token": small_store.token_text(i), "k": 7, "metric": metric}).json()
        assert by_id["query"] == {"id": i, "text": small_store.token_text(i), "provenance": small_store.provenance_of(i)}
        assert by_id["metric"] == metric and _as_neighbors(by_id) == expected
        assert [n["provenance"] for n in by_id["neighbors"]] == [small_store.provenance_of(n.id) for n in expected]
        assert by_text == by_id


def test_all_digit_token_is_a_text_when_a_token_has_that_text(http, small_store):
    digits = [i for i in range(small_store.vocab_size) if small_store.token_text(i).isdigit() and small_store.token_text(i) != str(i)]
    assert digits, "the BPE vocabulary has single-digit tokens"
    i = digits[0]
    text = small_store.token_text(i)
    by_text = http.get("/neighbors", params={"token": text, "metric": "l2", "k": 3}).json()
    by_id = http.get("/neighbors", params={"id": int(text), "metric": "l2", "k": 3}).json()
    assert by_text["query"]["id"] == i  # the token whose text it is ...
    assert by_id["query"]["id"] == int(text) != i  # ... while id= is always the id


def test_post_neighbors_equals_one_query_per_id(http, small_store, probes):
    body = http.post("/neighbors", json={"ids": probes, "k": 5, "metric": "geodesic"}).json()
    assert [r["query"]["id"] for r in body["results"]] == probes
    for i, r in zip(probes, body["results"]):
        assert _as_neighbors(r) == small_store.neighbors(i, k=5, metric="geodesic")


@pytest.mark.parametrize("metric", ["l2", "knn", "geodesic", "umap", "tree"])
def test_get_cost_equals_the_api(http, small_store, probes, metric):
    a, b = probes[0], probes[1]
    near = small_store.neighbors(a, k=1, metric=metric)[0].id  # a stored pair, not only the cap
    for x, y in ((a, b), (a, near)):
        body = http.get("/cost", params={"a": small_store.token_text(x), "b": str(y), "metric": metric}).json()
        assert body["a"]["id"] == x and body["b"]["id"] == y and body["metric"] == metric
        assert body["cost"] == pytest.approx(small_store.cost(x, y, metric), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("metric", ["l2", "knn", "tree"])
def test_post_cost_is_the_api_pair_by_pair(http, small_store, probes, metric):
    rng = np.random.default_rng(0)
    pairs = [[int(a), int(b)] for a, b in rng.integers(0, small_store.vocab_size, (200, 2))]
    pairs += [[p, small_store.neighbors(p, k=1, metric=metric)[0].id] for p in probes]  # stored costs
    pairs += [[probes[0], probes[0]], [small_store.token_text(probes[1]), probes[2]]]  # diagonal, a text
    costs = http.post("/cost", json={"pairs": pairs, "metric": metric}).json()["costs"]
    expected = [small_store.cost(a, b, metric) for a, b in pairs]
    np.testing.assert_allclose(costs, expected, rtol=1e-6, atol=1e-7)
    assert costs[-2] == 0.0


# -- bad input: a 4xx with a JSON error naming the value -------------------------------------
BAD_GETS = [
    # (path, params, status, type, words the message must contain)
    ("/neighbors", {"id": 1, "metric": "cosine"}, 400, "unknown_metric", ["'cosine'", "knn", "geodesic"]),
    ("/neighbors", {"id": 10**6}, 400, "bad_token", ["1000000", "out of range"]),
    ("/neighbors", {"id": -3}, 400, "bad_token", ["-3"]),
    ("/neighbors", {"token": " zzqqxx"}, 404, "token_not_found", ["' zzqqxx'"]),
    ("/neighbors", {"token": "../../etc/passwd"}, 404, "token_not_found", ["../../etc/passwd"]),
    ("/neighbors", {"token": " the", "id": 3}, 400, "bad_token", ["both", "' the'"]),
    ("/neighbors", {}, 400, "bad_token", ["neither"]),
    ("/neighbors", {"id": 1, "k": MAX_K + 1}, 422, "limit_exceeded", [f"k={MAX_K + 1}"]),
    ("/neighbors", {"id": 1, "k": 0}, 422, "limit_exceeded", ["k=0"]),
    ("/neighbors", {"id": "seven"}, 422, "invalid_request", ["id", "'seven'"]),
    ("/cost", {"a": 1, "b": 2, "metric": "../store"}, 400, "unknown_metric", ["'../store'"]),
    ("/cost", {"a": 1, "b": 99999}, 400, "bad_token", ["99999"]),
    ("/cost", {"a": 1}, 422, "invalid_request", ["b"]),
    ("/no-such-endpoint", {}, 404, "not_found", ["/no-such-endpoint"]),
]


@pytest.mark.parametrize("path,params,status,type_,words", BAD_GETS)
def test_bad_get_is_a_4xx_json_error_naming_the_value(http, path, params, status, type_, words):
    assert_error_names(http.get(path, params=params), status, type_, words)


@pytest.fixture(scope="module")
def duplicate_text_url(tmp_path_factory):
    """A real uvicorn server (in a thread) on a tiny store where ids 7 and 9 share a text."""
    from vocabmetric.building.embeddings import Embeddings
    from vocabmetric.metrics import KnnMetric
    from vocabmetric.store import TruncatedMetric, write_store

    class Tok:
        spec, fingerprint = "tiny:dup", "tiny-dup"

    vocab_size = 40
    vectors = np.random.default_rng(0).normal(size=(vocab_size, 8)).astype(np.float32)
    trained = np.ones(vocab_size, bool)
    knn = KnnMetric(k=4, progress=False).fit(vectors, trained)
    texts = [f" w{i}" for i in range(vocab_size)]
    texts[7] = texts[9] = " twin"
    path = write_store(
        tmp_path_factory.mktemp("dup") / "metric.zarr", tokenizer=Tok(), token_bytes=[t.encode() for t in texts],
        counts=np.ones(vocab_size, np.int64), embeddings=Embeddings(vectors, trained, np.full(vocab_size, -1, np.int32), "random"),
        corpus={}, metrics={"knn": TruncatedMetric(knn.indices_, knn.costs_, knn.cap_, knn.params_)},
    )
    with serve_in_thread(path, timeout=20) as url:
        yield url


def test_ambiguous_text_is_a_404_listing_the_candidate_ids(duplicate_text_url):
    response = httpx.get(f"{duplicate_text_url}/neighbors", params={"token": " twin"})
    assert_error_names(response, 404, "token_not_found", ["' twin'", "[7, 9]"])
    query = httpx.get(f"{duplicate_text_url}/neighbors", params={"id": 7, "k": 4}).json()["query"]
    assert query == {"id": 7, "text": " twin", "provenance": "trained"}
    with Client(duplicate_text_url) as c, pytest.raises(TokenNotFound, match="several ids"):
        c.cost(" twin", 3)


BAD_POSTS = [
    ("/neighbors", {"ids": list(range(MAX_BATCH + 1))}, 413, "batch_too_large", [str(MAX_BATCH + 1), str(MAX_BATCH)]),
    ("/neighbors", {"ids": [1, 10**7]}, 400, "bad_token", ["ids[1]", "10000000"]),
    ("/neighbors", {"ids": [1], "metric": "wasserstein"}, 400, "unknown_metric", ["'wasserstein'"]),
    ("/neighbors", {"ids": [1], "k": 10**6}, 422, "limit_exceeded", ["k=1000000"]),
    ("/neighbors", {"ids": ["3"]}, 422, "invalid_request", ["ids.0", "'3'"]),
    ("/neighbors", {"ids": [1], "path": "/etc"}, 422, "invalid_request", ["path"]),
    ("/cost", {"pairs": [[1, 2], [3, 5000]]}, 400, "bad_token", ["pairs[1][1]", "5000"]),
    ("/cost", {"pairs": [[1, " zzqqxx"]]}, 404, "token_not_found", ["' zzqqxx'"]),
    ("/cost", {"pairs": [[1, 2, 3]]}, 422, "invalid_request", ["pairs.0"]),
    ("/cost", {"pairs": [[1, 2.5]]}, 422, "invalid_request", ["2.5"]),
    ("/cost", {"pairs": [[1, 2]], "metric": "emd"}, 400, "unknown_metric", ["'emd'"]),
    ("/cost", {"pairs": [[0, 1]] * (MAX_PAIRS + 1)}, 413, "batch_too_large", [str(MAX_PAIRS + 1)]),
]


@pytest.mark.parametrize("path,body,status,type_,words", BAD_POSTS, ids=[f"{p}-{t}-{n}" for n, (p, _, _, t, _) in enumerate(BAD_POSTS)])
def test_bad_post_is_a_4xx_json_error_naming_the_value(http, path, body, status, type_, words):
    assert_error_names(http.post(path, json=body), status, type_, words)


@pytest.mark.parametrize("path", ["/neighbors", "/cost"])
def test_malformed_json_is_a_400(http, path):
    response = http.post(path, content=b'{"ids": [1, 2', headers={"content-type": "application/json"})
    assert_error_names(response, 400, "malformed_json", [])


def test_wrong_method_is_a_405_json_error(http):
    assert_error_names(http.delete("/cost"), 405, "method_not_allowed", [])


# -- concurrency --------------------------------------------------------------------------------
def test_a_burst_of_concurrent_requests_all_answer_right(base_url, small_store, probes):
    rng = np.random.default_rng(1)
    metrics = ["knn", "geodesic", "umap", "l2", "tree"]
    jobs = []
    for n in range(200):
        metric = metrics[n % len(metrics)]
        if n % 4 == 3:
            pairs = rng.integers(0, small_store.vocab_size, (16, 2)).tolist()
            jobs.append(("cost", metric, pairs))
        else:
            jobs.append(("neighbors", metric, int(rng.integers(0, small_store.vocab_size))))
    expected = [
        [small_store.cost(a, b, m) for a, b in arg] if kind == "cost" else small_store.neighbors(arg, k=5, metric=m)
        for kind, m, arg in jobs
    ]
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=base_url, timeout=60, limits=limits) as http:
        def call(job):
            kind, metric, arg = job
            if kind == "cost":
                r = http.post("/cost", json={"pairs": arg, "metric": metric})
                return r.status_code, r.json()["costs"]
            r = http.get("/neighbors", params={"id": arg, "k": 5, "metric": metric})
            return r.status_code, _as_neighbors(r.json())

        with ThreadPoolExecutor(max_workers=48) as pool:
            answers = list(pool.map(call, jobs))
    assert [status for status, _ in answers] == [200] * len(jobs)
    for (kind, _, _), (_, got), want in zip(jobs, answers, expected):
        if kind == "cost":
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        else:
            assert got == want


# -- the Python client ----------------------------------------------------------------------------
def test_client_answers_like_the_store(client, small_store, probes):
    i, j = probes[0], probes[1]
    text = small_store.token_text(i)
    assert client.neighbors(text, k=4, metric="knn") == small_store.neighbors(i, k=4, metric="knn")
    assert client.neighbors(i, k=4, metric="tree") == small_store.neighbors(i, k=4, metric="tree")
    assert client.neighbors_batch(probes[:3], k=3, metric="umap") == [small_store.neighbors(p, k=3, metric="umap") for p in probes[:3]]
    assert client.cost(text, j, metric="geodesic") == pytest.approx(small_store.cost(i, j, "geodesic"), rel=1e-6)
    pairs = [(i, j), (j, i), (text, i)]
    np.testing.assert_allclose(client.costs(pairs, metric="l2"), [small_store.cost(a, b, "l2") for a, b in pairs], rtol=1e-6, atol=1e-7)
    assert client.info()["fingerprint"] == small_store.fingerprint


def test_client_raises_the_error_classes_with_the_server_message(client, small_store):
    with pytest.raises(TokenNotFound, match="zzqqxx") as info:
        client.neighbors(" zzqqxx")
    assert info.value.status == 404
    with pytest.raises(TokenizerError, match=str(small_store.vocab_size + 5)):
        client.neighbors(small_store.vocab_size + 5)
    with pytest.raises(StoreError, match="'cosine'"):
        client.cost(1, 2, metric="cosine")
    with pytest.raises(ConfigError, match=f"k={MAX_K * 2}"):
        client.neighbors_batch([1, 2], k=MAX_K * 2)


def test_serve_with_two_workers_answers_like_the_store(small_store, tmp_path):
    with serve_subprocess(small_store.path, tmp_path / "serve.log", "--workers", "2", timeout=40) as url, Client(url, timeout=5) as c:
        for i in range(0, small_store.vocab_size, 97):
            assert c.neighbors(i, k=3, metric="knn") == small_store.neighbors(i, k=3, metric="knn")


def test_client_without_a_server_says_how_to_start_one():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(VocabMetricError, match="vocabmetric serve"):
            c.info()


# -- issue 16: a service that cannot be knocked over ---------------------------------------------
def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://")[1].split(":")
    return host, int(port)


def _read_until_closed(sock, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` s pass)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


@pytest.fixture(scope="module")
def guarded_url(small_store, tmp_path_factory):
    """``vocabmetric serve --workers 2`` with 1-s header and body timeouts."""
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    with serve_subprocess(small_store.path, log, "--workers", "2", "--header-timeout", "1", "--body-timeout", "1",
                          timeout=60) as url:
        yield url


def test_a_chunked_body_is_refused_at_the_limit_without_reading_the_rest(base_url):
    """Item 3: a chunked body has no Content-Length; it is counted as it arrives and refused
    at MAX_BODY_BYTES with a 413, while the client is still sending (never read whole)."""
    import select
    import socket

    from vocabmetric.query.service import MAX_BODY_BYTES

    host, port = _host_port(base_url)
    sock = socket.create_connection((host, port), timeout=10)
    head = f"POST /cost HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = b'{"pairs": [[0, 1]]'
    sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(first), first))
    padding = b" " * (1 << 16)  # valid JSON whitespace: only its size is wrong
    sent, answered = 0, False
    while sent < 4 * MAX_BODY_BYTES:
        if select.select([sock], [], [], 0)[0]:
            answered = True
            break
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(padding), padding))
        except OSError:  # the server closed after refusing
            answered = True
            break
        sent += len(padding)
    response = _read_until_closed(sock)
    sock.close()
    assert answered, f"no answer after {sent} bytes, {sent / MAX_BODY_BYTES:.0f}x the limit: the body is being read whole"
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "batch_too_large" and str(MAX_BODY_BYTES) in body["error"]["message"]


OVERFLOWS = [
    # item 4: inputs that were 500s (method, path, params or JSON body, status, type, words)
    ("GET", "/neighbors", {"token": "①"}, 404, "token_not_found", ["'①'"]),
    ("GET", "/cost", {"a": "①", "b": "5"}, 404, "token_not_found", ["'①'"]),
    ("GET", "/neighbors", {"token": "9" * 5000}, 400, "bad_token", ["5000 digits", "out of range"]),
    ("GET", "/cost", {"a": "5", "b": "1" * 4301}, 400, "bad_token", ["4301 digits"]),
    ("POST", "/neighbors", {"ids": [1, 2**70]}, 400, "bad_token", ["ids[1]", "beyond int64"]),
    ("POST", "/neighbors", {"ids": [-(2**64)]}, 400, "bad_token", ["ids[0]", "beyond int64"]),
    ("POST", "/cost", {"pairs": [[1, 2], [2**63, 1]]}, 400, "bad_token", ["pairs[1][0]", "beyond int64"]),
    ("POST", "/cost", {"pairs": [["5", 1], [2, 2**90]]}, 400, "bad_token", ["pairs[1][1]", "beyond int64"]),
    ("POST", "/cost", {"pairs": [["①", 1]]}, 404, "token_not_found", ["'①'"]),
]


@pytest.mark.parametrize("method,path,given,status,type_,words", OVERFLOWS, ids=[f"{m}{p}-{n}" for n, (m, p, *_) in enumerate(OVERFLOWS)])
def test_ids_beyond_int64_and_non_ascii_digits_are_4xx_not_500(http, method, path, given, status, type_, words):
    response = http.get(path, params=given) if method == "GET" else http.post(path, json=given)
    assert_error_names(response, status, type_, words)


def test_a_json_integer_too_long_to_convert_is_a_4xx(http):
    body = b'{"ids": [' + b"7" * 5000 + b"]}"
    response = http.post("/neighbors", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    _error(response)


@pytest.mark.parametrize("text,looks_like", [("٣", 3), ("１２", 12), ("³", 3)])
def test_only_ascii_digits_make_an_id(http, small_store, text, looks_like):
    """Item 5: Arabic-Indic, fullwidth and superscript digits are texts, never ids."""
    assert text.isdigit()  # what used to make it an id
    assert not small_store.ids_of_text(text)  # no token has that text in the small store
    assert_error_names(http.get("/neighbors", params={"token": text}), 404, "token_not_found", [repr(text)])
    assert_error_names(http.get("/cost", params={"a": text, "b": "5"}), 404, "token_not_found", [repr(text)])
    ascii_id = http.get("/neighbors", params={"token": str(looks_like)}).json()["query"]["id"]  # ASCII digits still work
    assert ascii_id in (small_store.ids_of_text(str(looks_like)) or [looks_like])


def test_two_workers_answer_keep_alive_requests_without_nagle_delay(guarded_url):
    """Item 6: with --workers 2, header and body segments met Nagle + delayed ACK: +40 ms a request."""
    import time

    with httpx.Client(base_url=guarded_url, timeout=10) as c:
        for _ in range(5):
            c.get("/neighbors", params={"id": 5, "metric": "knn"})
        times = []
        for n in range(50):
            t0 = time.perf_counter()
            assert c.get("/neighbors", params={"id": 5 + n, "k": 10, "metric": "knn"}).status_code == 200
            times.append((time.perf_counter() - t0) * 1e3)
    assert np.median(times) < 20, f"median {np.median(times):.1f} ms over 50 keep-alive requests (Nagle: ~44 ms)"


@pytest.mark.parametrize("sent", [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b""], ids=["partial-headers", "nothing"])
def test_a_half_open_connection_is_closed_within_the_header_timeout(guarded_url, sent):
    """Item 7: a client that sends part of its headers (or nothing), then waits, is let go."""
    import socket
    import time

    sock = socket.create_connection(_host_port(guarded_url), timeout=10)
    t0 = time.monotonic()
    sock.sendall(sent)
    data = _read_until_closed(sock, timeout=10)
    elapsed = time.monotonic() - t0
    sock.close()
    assert data == b"" and elapsed < 5, f"held {elapsed:.1f} s (header timeout 1 s)"


def test_a_stalled_body_is_a_408_within_the_body_timeout(guarded_url):
    import socket
    import time

    sock = socket.create_connection(_host_port(guarded_url), timeout=10)
    t0 = time.monotonic()
    sock.sendall(b"POST /cost HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pairs\": ")
    response = _read_until_closed(sock, timeout=10)
    elapsed = time.monotonic() - t0
    sock.close()
    assert response.startswith(b"HTTP/1.1 408") and elapsed < 5, (elapsed, response[:200])
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "request_timeout"


@pytest.fixture(scope="module")
def budget_client(small_store):
    """The real app in-process (Starlette's TestClient) with a work budget of 5,000."""
    from starlette.testclient import TestClient

    from vocabmetric.query.service import create_app

    with TestClient(create_app(small_store.path, max_work=5000)) as c:
        yield c


def test_a_request_over_the_work_budget_is_a_422_naming_the_limit(budget_client, small_store):
    """Item 8: ids × k (stored), ids × V (exact), pairs: over max_work is a 422 stating it."""
    V = small_store.vocab_size
    stored = budget_client.post("/neighbors", json={"ids": list(range(50)), "k": 101, "metric": "knn"})
    assert_error_names(stored, 422, "limit_exceeded", ["50 ids", "k=101", "5,050", "5,000", "at most 49 ids"])
    assert budget_client.post("/neighbors", json={"ids": list(range(50)), "k": 100, "metric": "knn"}).status_code == 200
    exact = budget_client.post("/neighbors", json={"ids": list(range(6)), "k": 1, "metric": "l2"})
    assert_error_names(exact, 422, "limit_exceeded", ["6 ids", f"{V:,} tokens", "5,000", f"at most {5000 // V} ids"])
    assert budget_client.post("/neighbors", json={"ids": list(range(5000 // V)), "k": 1, "metric": "l2"}).status_code == 200
    pairs = budget_client.post("/cost", json={"pairs": [[0, 1]] * 5001})
    assert_error_names(pairs, 422, "limit_exceeded", ["5,001 pairs", "5,000"])
    assert budget_client.get("/info").json()["limits"]["max_work"] == 5000


def test_exact_scans_run_off_the_event_loop(http):
    """Item 8: a batch of exact l2 scans runs in the threadpool: the event-loop thread's CPU
    time (Server-Timing cpu) is a small part of the request's wall time."""
    timings = []
    for _ in range(3):  # the best of three: a garbage collection may land on the loop thread
        response = http.post("/neighbors", json={"ids": list(range(1000)), "k": 1, "metric": "l2"})
        assert response.status_code == 200
        parts = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
        timings.append((float(parts["cpu"]) / float(parts["app"]), parts))
    assert min(timings)[0] < 0.5, timings


def test_openapi_documents_the_errors_the_limits_and_the_metrics(http, small_store):
    """Item 9: the error body, 400/404/413/422, k's bounds, the metrics as an enum."""
    schema = http.get("/openapi.json").json()
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["$ref"].endswith("/ErrorDetail")
    assert set(schema["components"]["schemas"]["ErrorDetail"]["required"]) == {"type", "message"}
    expected = {("/neighbors", "get"): {"400", "404", "422"}, ("/neighbors", "post"): {"400", "413", "422"},
                ("/cost", "get"): {"400", "404", "422"}, ("/cost", "post"): {"400", "404", "413", "422"}}
    for (path, method), statuses in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, method, set(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    params = {p["name"]: p["schema"] for p in schema["paths"]["/neighbors"]["get"]["parameters"]}
    assert (params["k"]["minimum"], params["k"]["maximum"]) == (1, MAX_K)
    assert params["metric"]["enum"] == small_store.metrics
    batch = schema["components"]["schemas"]["NeighborsBatchRequest"]["properties"]
    assert batch["ids"]["maxItems"] == MAX_BATCH and batch["ids"]["items"]["maximum"] == small_store.vocab_size - 1
    assert (batch["k"]["minimum"], batch["k"]["maximum"]) == (1, MAX_K) and batch["metric"]["enum"] == small_store.metrics
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's 422 body is not what we send


@pytest.mark.parametrize("method,path,allowed", [("DELETE", "/cost", "GET, POST"), ("PUT", "/neighbors", "GET, POST"),
                                                  ("POST", "/healthz", "GET"), ("PATCH", "/info", "GET")])
def test_a_405_lists_the_allowed_methods(http, method, path, allowed):
    response = http.request(method, path)
    assert_error_names(response, 405, "method_not_allowed", [allowed])
    assert response.headers["allow"] == allowed
