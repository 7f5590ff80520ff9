"""The explorer page in a real headless Chromium, against a real ``vocabmetric serve``.

The small store (``small_store``) is served by a ``vocabmetric serve`` subprocess on
loopback; Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium) loads
``/``, searches a token, and the neighbour tables read back from the DOM must equal the
Python API; hovering and clicking a point of the map, wheel zoom and drag pan are checked on
the canvas. A tiny store written here holds tokens whose text is HTML
(``<img src=x onerror=alert(1)>``, ...): they must show as text, never as elements.
``GET /projection`` is decoded here independently and compared with the store.

Without ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``make browser`` installs them)
the browser tests skip, saying so; the HTTP tests still run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import serve_in_thread, serve_subprocess
from vocabmetric.errors import StoreError

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
XSS = "<img src=x onerror=alert(1)>"
HTML_TOKENS = [XSS, "&lt;b&gt;bold", "<script>alert(2)</script>"]
WINDOW = (1400, 1000)


def shown(text: str) -> str:
    """How the page shows a token: a space is ␣ (and a newline ↵, a tab ⇥)."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") if text else "∅ (empty)"


@pytest.fixture(scope="module")
def small_url(small_store_url):
    """``vocabmetric serve`` on the small store (a subprocess on loopback)."""
    return small_store_url


def _write_tiny_store(path: Path, *, projection: bool) -> tuple[Path, np.ndarray]:
    """A 60-token store whose tokens 5..7 are HTML; token 5 is the nearest neighbour of 10.
    Token 59 is untrained (NaN on the map). Returns (store path, the 2-D map it holds)."""
    from vocabmetric.building.embeddings import Embeddings
    from vocabmetric.metrics import KnnMetric
    from vocabmetric.store import TruncatedMetric, write_store

    class Tok:
        spec, fingerprint = "tiny:html", "tiny-html"

    vocab_size = 60
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(vocab_size, 8)).astype(np.float32)
    vectors[5] = vectors[10] + 0.01
    trained = np.ones(vocab_size, bool)
    trained[59] = False
    texts = [f" w{i}" for i in range(vocab_size)]
    texts[5:8] = HTML_TOKENS
    knn = KnnMetric(k=4, progress=False).fit(vectors, trained)
    xy = rng.uniform(-5, 5, size=(vocab_size, 2)).astype(np.float32)
    xy[~trained] = np.nan
    write_store(path, tokenizer=Tok(), token_bytes=[t.encode() for t in texts], counts=np.ones(vocab_size, np.int64),
                embeddings=Embeddings(vectors, trained, np.full(vocab_size, -1, np.int32), "random"), corpus={},
                metrics={"knn": TruncatedMetric(knn.indices_, knn.costs_, knn.cap_, knn.params_)},
                extra_arrays={"projection2d": xy} if projection else {})
    return path, xy


@pytest.fixture(scope="module")
def html_store(tmp_path_factory):
    return _write_tiny_store(tmp_path_factory.mktemp("html") / "metric.zarr", projection=True)


@pytest.fixture(scope="module")
def html_url(html_store):
    """The tiny HTML-token store, served by uvicorn in a thread on loopback."""
    with serve_in_thread(html_store[0]) as url:
        yield url


# -- the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver; skips when they are not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"Chromium is not installed ({', '.join(missing)} missing): `make browser` installs "
                    "Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 45):  # generous: CI machines may be loaded
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a table re-rendered while the condition reads it is "not yet", not a failure
    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored).until(
            lambda d: condition(d))
    except Exception as exc:
        status = driver.execute_script("return document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from exc


def _open(driver, url: str, fragment: str = "") -> None:
    driver.get("about:blank")  # a fresh page: only the fragment may differ from the last one
    driver.get(f"{url}/{fragment}")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.map"), "the map to load")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.state") == "ready", "the page to be ready")


def _query_id(driver) -> int | None:
    value = driver.execute_script("return document.body.dataset.queryId")
    return int(value) if value is not None else None


def _table(driver, side: str) -> list[tuple[int, int, str, float, str]]:
    """(rank, id, token as shown, cost, provenance) of each row of one neighbour table, read from the DOM."""
    from selenium.webdriver.common.by import By

    rows = []
    for tr in driver.find_elements(By.CSS_SELECTOR, f"#table-{side} tbody tr"):
        rank, id_, token, cost, provenance = (td.text for td in tr.find_elements(By.TAG_NAME, "td"))
        assert tr.get_attribute("data-id") == id_ and tr.get_attribute("data-provenance") == provenance
        rows.append((int(rank), int(id_), token, float(cost), provenance))
    return rows


def _select(driver, side: str, metric: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", f"metric-{side}")).select_by_value(metric)


def _search(driver, text: str) -> None:
    box = driver.find_element("id", "query")
    box.clear()
    box.send_keys(text)
    driver.find_element("css selector", "#search button[type=submit]").click()


def _expected(store, query: int, metric: str, k: int) -> list[tuple[int, int, str, float, str]]:
    return [(rank, n.id, shown(n.text), n.cost, store.provenance_of(n.id))
            for rank, n in enumerate(store.neighbors(query, k=k, metric=metric), 1)]


def _same_rows(got, want) -> None:
    assert [r[:3] + r[4:] for r in got] == [r[:3] + r[4:] for r in want]
    np.testing.assert_allclose([r[3] for r in got], [r[3] for r in want], rtol=1e-3, atol=1e-6)


def _probe(store) -> int:
    """A frequent trained token whose text starts with a space (the space must be typed)."""
    usable = store.usable
    for i in np.argsort(-store.counts, kind="stable"):
        text = store.token_text(i)
        if usable[i] and text.startswith(" ") and text[1:].isalpha() and len(text) > 3 and len(store.ids_of_text(text)) == 1:
            return int(i)
    raise AssertionError("the small store has no frequent word token")


def test_search_fills_both_tables_exactly_as_the_python_api(browser, small_url, small_store, tmp_path):
    _open(browser, small_url)
    options = [o.get_attribute("value") for o in browser.find_elements("css selector", "#metric-a option")]
    assert options == small_store.metrics  # every metric of the store, in its order
    query = _probe(small_store)
    text = small_store.token_text(query)
    _select(browser, "a", "geodesic")
    _select(browser, "b", "tree")
    k_box = browser.find_element("id", "k")
    k_box.clear()
    k_box.send_keys("7")
    _search(browser, text)
    _wait(browser, lambda d: _query_id(d) == query, f"the query to become id {query}")
    assert browser.find_element("id", "query-preview").text == shown(text)  # the leading space is visible
    assert shown(text) in browser.find_element("id", "query-info").text
    _same_rows(_table(browser, "a"), _expected(small_store, query, "geodesic", 7))
    _same_rows(_table(browser, "b"), _expected(small_store, query, "tree", 7))

    # the same text without its leading space is another token (or none): never the query
    _search(browser, text.lstrip(" "))
    ids = small_store.ids_of_text(text.lstrip(" "))
    if ids:
        _wait(browser, lambda d: _query_id(d) == ids[0], "the unspaced token")
    else:
        _wait(browser, lambda d: "no token has the text" in d.find_element("id", "status").text, "the not-found error")
        assert _query_id(browser) == query

    # #id names an id; changing a metric re-asks the neighbours of the same query
    _search(browser, "#12")
    _wait(browser, lambda d: _query_id(d) == 12, "the query #12")
    _select(browser, "b", "knn")
    want = _expected(small_store, 12, "knn", 7)
    _wait(browser, lambda d: [r[:3] for r in _table(d, "b")] == [r[:3] for r in want], "the knn table of #12")
    _same_rows(_table(browser, "b"), _expected(small_store, 12, "knn", 7))
    browser.save_screenshot(str(tmp_path / "explorer-search.png"))
    assert (tmp_path / "explorer-search.png").stat().st_size > 10_000


def _isolated_point(xy: np.ndarray, exclude: set[int]) -> int:
    """The token on the map farthest from its nearest other point (safe to click)."""
    ids = np.flatnonzero(np.isfinite(xy).all(axis=1))
    pts = xy[ids].astype(np.float64)
    gaps = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    np.fill_diagonal(gaps, np.inf)
    order = np.argsort(-gaps.min(axis=1))
    return int(next(ids[o] for o in order if int(ids[o]) not in exclude))


def _point_on_screen(driver, token_id: int) -> tuple[float, float]:
    pos = driver.execute_script("return window.vocabmetricExplorer.screenPosition(arguments[0])", token_id)
    assert pos is not None, f"token {token_id} is not on the map"
    return pos["x"], pos["y"]


def _offset_from_center(driver, x: float, y: float) -> tuple[int, int]:
    canvas = driver.find_element("id", "map")
    return round(x - canvas.size["width"] / 2), round(y - canvas.size["height"] / 2)


LAYOUT = """
const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const out = { page: [document.documentElement.scrollWidth, window.innerWidth] };
for (const id of ["table-a", "table-b", "map", "panel-a", "panel-b"]) out[id] = box(document.getElementById(id));
out.cells = [...document.querySelectorAll("#tables td, #tables th")].map((td) => [td.closest("table").id, ...box(td)]);
return out;
"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.mark.parametrize("width", [1280, 1400])
def test_the_page_opens_on_an_example_and_fits_a_laptop_width(browser, small_url, small_store, width, tmp_path):
    """No address fragment: the page opens on the store's example token with both tables
    filled; at 1,280 and 1,400 px the tables and the map do not overlap, every cell lies
    inside its own table's panel, and nothing is cut at the right edge."""
    example = httpx.get(f"{small_url}/info").json()["example"]
    assert example is not None and small_store.usable[example["id"]]
    browser.set_window_size(width, 900)
    try:
        _open(browser, small_url)
        _wait(browser, lambda d: _query_id(d) == example["id"], "the example query")
        _wait(browser, lambda d: d.execute_script("return document.body.dataset.state") == "ready", "the tables")
        assert browser.find_element("id", "query").get_attribute("value") == example["text"]
        assert len(_table(browser, "a")) == 10 and len(_table(browser, "b")) == 10
        time.sleep(0.3)
        browser.save_screenshot(str(tmp_path / f"explorer-{width}.png"))
        got = browser.execute_script(LAYOUT)
    finally:
        browser.set_window_size(*WINDOW)
    page_width, viewport = got["page"]
    assert page_width <= viewport, f"the page is {page_width} px wide in a {viewport} px window (a cut column)"
    assert not _overlap(got["table-a"], got["table-b"]), got
    for table in ("table-a", "table-b"):
        assert not _overlap(got[table], got["map"]), (table, got)
        assert got[table][2] <= viewport
    for table, *cell in got["cells"]:
        panel = got["panel-a" if table == "table-a" else "panel-b"]
        assert panel[0] - 0.5 <= cell[0] and cell[2] <= panel[2] + 0.5, (table, cell, panel)


def test_hover_shows_the_token_and_a_click_makes_it_the_query(browser, small_url, small_store, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    start = _probe(small_store)
    _open(browser, small_url, f"#id={start}&a=knn&b=geodesic&k=5")
    _wait(browser, lambda d: _query_id(d) == start, "the query from the address")
    target = _isolated_point(small_store.projection2d(), {start})
    canvas = browser.find_element("id", "map")
    dx, dy = _offset_from_center(browser, *_point_on_screen(browser, target))
    ActionChains(browser).move_to_element_with_offset(canvas, dx, dy).perform()
    tooltip = browser.find_element("id", "tooltip")
    _wait(browser, lambda d: tooltip.is_displayed() and shown(small_store.token_text(target)) in tooltip.text,
          "the tooltip to show the hovered token")
    assert tooltip.get_attribute("data-id") == str(target)
    ActionChains(browser).click().perform()
    _wait(browser, lambda d: _query_id(d) == target, f"the clicked point {target} to become the query")
    _same_rows(_table(browser, "a"), _expected(small_store, target, "knn", 5))
    assert f"id={target}" in browser.current_url  # the address keeps the query
    browser.save_screenshot(str(tmp_path / "explorer-click.png"))


def test_wheel_zooms_about_the_pointer_and_drag_pans_without_changing_the_query(browser, small_url, small_store):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    start = _probe(small_store)
    _open(browser, small_url, f"#id={start}")
    _wait(browser, lambda d: _query_id(d) == start, "the query from the address")
    canvas = browser.find_element("id", "map")
    xy = small_store.projection2d()
    ids = np.flatnonzero(np.isfinite(xy).all(axis=1))
    a, b = int(ids[0]), int(ids[-1])
    before = np.subtract(_point_on_screen(browser, a), _point_on_screen(browser, b))
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -300).perform()  # wheel up: zoom in
    _wait(browser, lambda d: abs(np.hypot(*np.subtract(_point_on_screen(d, a), _point_on_screen(d, b)))) >
          1.2 * np.hypot(*before), "the map to zoom in")

    # a drag from an empty spot moves every point by the drag and is not a click
    x0, y0 = _point_on_screen(browser, a)
    xy_on_screen = np.array([_point_on_screen(browser, int(i)) for i in ids[:: max(1, len(ids) // 50)]])
    size = canvas.size
    # inset so that the whole drag (+60, +35) stays on the canvas, whichever corner is chosen
    right, bottom = size["width"] - 100, size["height"] - 60
    corners = [(20, 20), (right, 20), (20, bottom), (right, bottom)]
    empty = max(corners, key=lambda c: np.min(np.hypot(*(xy_on_screen - c).T)))
    ActionChains(browser).move_to_element_with_offset(canvas, *_offset_from_center(browser, *empty)) \
        .click_and_hold().move_by_offset(40, 25).move_by_offset(20, 10).release().perform()
    _wait(browser, lambda d: np.allclose(np.subtract(_point_on_screen(d, a), (x0, y0)), (60, 35), atol=1.5),
          "the map to pan by the drag")
    assert _query_id(browser) == start


def test_html_token_text_is_shown_as_text_never_as_html(browser, html_url, html_store, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _open(browser, html_url)
    _search(browser, XSS)
    _wait(browser, lambda d: _query_id(d) == 5, "the HTML token to be the query")
    assert shown(XSS) in browser.find_element("id", "query-info").text
    assert browser.find_element("id", "query-preview").text == shown(XSS)

    _search(browser, " w10")  # token 5 is the nearest neighbour of token 10
    _wait(browser, lambda d: _query_id(d) == 10, "the query w10")
    shown_tokens = [row[2] for row in _table(browser, "a")]
    assert shown_tokens[0] == shown(XSS)
    for text in HTML_TOKENS:  # every HTML token in a table is its literal text
        _search(browser, text)
        _wait(browser, lambda d, text=text: d.find_element("id", "query-info").text.startswith(f"query {shown(text)}"),
              f"the query {text!r}")
    # hovering the HTML token on the map shows it as text too
    canvas = browser.find_element("id", "map")
    ActionChains(browser).move_to_element_with_offset(canvas, *_offset_from_center(browser, *_point_on_screen(browser, 5))).perform()
    tooltip = browser.find_element("id", "tooltip")
    _wait(browser, lambda d: tooltip.is_displayed() and shown(XSS) in tooltip.text, "the tooltip of the HTML token")

    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "main script, header script, #tooltip *:not(span)") == []
    try:
        alert = browser.switch_to.alert
        text = alert.text
        alert.dismiss()
        pytest.fail(f"a token's text ran as a script (alert {text!r})")
    except NoAlertPresentException:
        pass
    browser.save_screenshot(str(tmp_path / "explorer-html-tokens.png"))


def test_the_query_and_every_row_show_their_provenance(browser, tmp_path):
    from test_provenance import EXPECTED, four_provenances, write

    from vocabmetric import open_store

    store = open_store(write(tmp_path / "metric.zarr", four_provenances()))
    with serve_in_thread(store.path) as url:
        _open(browser, url)
        _search(browser, " w40")  # composed
        _wait(browser, lambda d: _query_id(d) == 40, "the composed query")
        info = browser.find_element("id", "query-info")
        assert info.get_attribute("data-provenance") == "composed" and "· composed" in info.text
        _same_rows(_table(browser, "a"), _expected(store, 40, "knn", 10))
        assert {row[4] for row in _table(browser, "a")} >= {"trained", "composed"}
        assert [row[4] for row in _table(browser, "a")] == [EXPECTED[row[1]] for row in _table(browser, "a")]
        _search(browser, " w55")  # no vector
        _wait(browser, lambda d: _query_id(d) == 55, "the query without a vector")
        assert "· none" in info.text and "no neighbours" in info.text and _table(browser, "a") == []


# -- the page and the map over HTTP (no browser needed) ----------------------------------------------
def _decode(body: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    """GET /projection, decoded from its documented layout (independently of the service)."""
    length = int.from_bytes(body[:4], "little")
    assert (4 + length) % 4 == 0
    header = json.loads(body[4:4 + length].decode())
    n = header["count"]
    ids = np.frombuffer(body, dtype="<u4", count=n, offset=4 + length)
    q = np.frombuffer(body, dtype="<u2", count=2 * n, offset=4 + length + 4 * n).reshape(n, 2)
    assert len(body) == 4 + length + 8 * n
    x0, y0, x1, y1 = header["bounds"]
    return header, ids, np.column_stack([x0 + q[:, 0] / 65535 * (x1 - x0), y0 + q[:, 1] / 65535 * (y1 - y0)])


def test_projection_is_every_trained_token_to_16_bits(small_url, small_store):
    response = httpx.get(f"{small_url}/projection")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    header, ids, xy = _decode(response.content)
    stored = small_store.projection2d()
    assert stored.shape == (small_store.vocab_size, 2) and stored.dtype == np.float32
    on_map = np.isfinite(stored).all(axis=1)
    assert np.array_equal(on_map, small_store.usable)  # NaN exactly for the untrained tokens
    assert header["vocab_size"] == small_store.vocab_size and header["count"] == on_map.sum()
    assert np.array_equal(ids, np.flatnonzero(on_map))
    extent = np.ptp(stored[on_map], axis=0)
    assert np.all(np.abs(xy - stored[ids]) <= extent / 65535 / 2 + 1e-6 * np.abs(stored[ids]).max())

    from vocabmetric.query.service import Client

    with Client(small_url) as client:
        client_ids, client_xy = client.projection()
    assert np.array_equal(client_ids, ids) and np.allclose(client_xy, xy)


def test_page_and_its_files_are_served_with_a_strict_content_policy(small_url):
    page = httpx.get(f"{small_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        assert httpx.get(f"{small_url}/{asset}").status_code == 200
    missing = httpx.get(f"{small_url}/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_a_store_without_a_map_answers_404_and_says_how_to_get_one(tmp_path):
    from vocabmetric import open_store
    from vocabmetric.query.service import Client

    path, _ = _write_tiny_store(tmp_path / "metric.zarr", projection=False)
    with pytest.raises(StoreError, match="no 2-D map.*vocabmetric build"):
        open_store(path).projection2d()
    with serve_in_thread(path) as url:
        response = httpx.get(f"{url}/projection")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "no_projection"
        assert "metric.zarr" in response.json()["error"]["message"]
        with Client(url) as client, pytest.raises(StoreError, match="no 2-D map"):
            client.projection()
        assert httpx.get(f"{url}/neighbors", params={"id": 10, "k": 2}).status_code == 200  # the rest still works


@pytest.mark.skipif(not Path(__file__).resolve().parent.parent.joinpath("runs/demo/metric.zarr").is_dir(),
                    reason="no demo store (build it with `vocabmetric build pipelines/demo.toml`)")
@pytest.mark.slow
def test_demo_screenshot(browser):  # pragma: no cover - regenerates docs/explorer.png by hand
    """``pytest -m slow tests/test_explorer.py -k demo``: docs/explorer.png from the demo store."""
    repo = Path(__file__).resolve().parent.parent
    with serve_subprocess(repo / "runs/demo/metric.zarr", repo / "runs/demo/serve.log") as url:
        _open(browser, url, "#token=%20beautiful&a=knn&b=geodesic&k=12")
        _wait(browser, lambda d: _query_id(d) is not None, "the demo query")
        time.sleep(0.5)
        (repo / "docs").mkdir(exist_ok=True)
        browser.save_screenshot(str(repo / "docs" / "explorer.png"))
