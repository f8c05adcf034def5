"""The search page in headless Chromium, against the search application inside Ray Serve.

A user opens the page, picks a query image and sees the top-k as cards with thumbnails,
scores and labels; the same answer as the API's, from the model and index version that
``/version`` names. A server that requires a query token gets it from the user through the
page (checked against the HTTP API served in-process by uvicorn, with real shard replicas
called directly). Chromium is Debian's (``make browser`` installs it with its chromedriver);
Selenium is pointed at both, so it never downloads a browser.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from retrieval.config import ServingSpec
from retrieval.index import ModelRef, build_shards, read_manifest
from retrieval.serving.images import decode_image

APP_NAME = "retrieval-search-page-test"
ROUTE = "/search-page-test"
COUNT = 60
FIRST_ID = 500
K = 6
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Bounded waits: the first query loads the model in the embedder replica.
PAGE_WAIT_S = 90
TOKEN_ENV = "RETRIEVAL_PAGE_TEST_QUERY_TOKEN"
TOKEN = "page-test-token-5d1c"


@dataclass
class Deployed:
    url: str
    index_version: str
    model: ModelRef
    thumbnails: dict[int, bytes]


def png_bytes(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def deployed(
    ray_cluster: Any,
    serve_instance: str,
    model_package: Path,
    tmp_path_factory: pytest.TempPathFactory,
    http_ready: Any,
) -> Iterator[Deployed]:
    from ray import serve

    from retrieval.serving.app import build_app
    from retrieval.tracking.registry import load_embedder

    embedder = load_embedder(str(model_package))
    vectors = np.random.default_rng(3).standard_normal((COUNT, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(FIRST_ID, FIRST_ID + COUNT, dtype=np.int64)
    thumbnails = {item_id: png_bytes(seed=item_id, size=16) for item_id in ids.tolist()}
    model = ModelRef(name="untrained", version="1", uri=str(model_package))
    root = tmp_path_factory.mktemp("page-index")
    build_shards(
        vectors=vectors,
        ids=ids,
        items=[{"label": f"class {item_id % 5}", "source": f"random:{item_id}"} for item_id in ids.tolist()],
        out_root=root,
        num_shards=2,
        model=model,
        gallery={"dataset": "random", "count": COUNT},
        thumbnails=[thumbnails[item_id] for item_id in ids.tolist()],
    )
    manifest, _ = read_manifest(root)
    assert manifest.thumbnails

    serve.run(
        build_app({"index": str(root), "tracking_uri": None, "max_k": 20, "default_k": 4}),
        name=APP_NAME,
        route_prefix=ROUTE,
    )
    url = f"http://127.0.0.1:{ray_cluster.serve_port}{ROUTE}"
    http_ready(f"{url}/readyz", deadline_s=60)
    try:
        yield Deployed(url=url, index_version=manifest.index_version, model=model, thumbnails=thumbnails)
    finally:
        serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"the search page test needs {' and '.join(missing)}: run `make browser` (Debian's chromium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, deployed: Deployed) -> None:
    """Load the page (from the prefix without its slash, as a user types it) and wait for /version."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(deployed.url)
    WebDriverWait(browser, PAGE_WAIT_S).until(
        lambda driver: driver.find_element(By.ID, "served").get_attribute("data-index-version")
    )
    # Redirected to "<prefix>/", where the page's relative links resolve under the prefix.
    assert browser.current_url == f"{deployed.url}/"


def search_with_file(browser: Any, path: Path, *, k: int | None) -> None:
    from selenium.webdriver.common.by import By

    if k is not None:
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys(str(k))
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "search-image").click()


def test_a_query_image_shows_the_api_answer_as_cards_with_thumbnails(
    deployed: Deployed, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    version = requests.get(f"{deployed.url}/version", timeout=30).json()
    open_page(browser, deployed)
    served = browser.find_element(By.ID, "served")
    assert served.get_attribute("data-index-version") == version["index_version"] == deployed.index_version
    assert f"{deployed.model.name} version {deployed.model.version}" in served.text
    assert not browser.find_element(By.ID, "text-form").is_displayed()  # an image-only model

    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(seed=99, size=32))
    search_with_file(browser, query, k=K)
    cards = WebDriverWait(browser, PAGE_WAIT_S).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results li.card") or None
    )
    assert len(cards) == K

    with query.open("rb") as file:
        files = {"file": ("query.png", file, "image/png")}
        direct = requests.post(f"{deployed.url}/search/image", files=files, data={"k": str(K)}, timeout=60).json()
    assert [int(card.get_attribute("data-id")) for card in cards] == [hit["id"] for hit in direct["results"]]
    np.testing.assert_allclose(
        [float(card.get_attribute("data-score")) for card in cards],
        [hit["score"] for hit in direct["results"]],
        rtol=1e-5,
        atol=1e-6,
    )
    for card, hit in zip(cards, direct["results"], strict=True):
        assert hit["label"] in card.text and f"#{hit['id']}" in card.text and f"{hit['score']:.4f}" in card.text

    # Every thumbnail loaded and decoded: the browser knows its pixel size.
    WebDriverWait(browser, PAGE_WAIT_S).until(
        lambda driver: all(card.get_attribute("data-thumbnail") for card in cards)
    )
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#results li.card img')].map(img => [img.complete, img.naturalWidth]);"
    )
    assert sizes == [[True, 16]] * K

    answered = browser.find_element(By.ID, "answered")
    assert answered.get_attribute("data-index-version") == version["index_version"]
    assert answered.get_attribute("data-model") == f"{deployed.model.name}/{deployed.model.version}"
    assert not browser.find_element(By.ID, "warning").is_displayed()
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_file_that_is_not_an_image_shows_the_servers_error(deployed: Deployed, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, deployed)
    bogus = tmp_path / "notes.txt"
    bogus.write_bytes(b"these are words, not pixels")
    with bogus.open("rb") as file:
        direct = requests.post(f"{deployed.url}/search/image", files={"file": ("notes.txt", file)}, timeout=60)
    assert direct.status_code == 400 and direct.json()["error"]["type"] == "not_an_image"

    search_with_file(browser, bogus, k=None)
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, PAGE_WAIT_S).until(lambda _: error.is_displayed())
    assert error.get_attribute("data-type") == "not_an_image"
    assert error.find_element(By.CLASS_NAME, "error-message").text == direct.json()["error"]["message"]
    assert browser.find_elements(By.CSS_SELECTOR, "#results li.card") == []


class PixelEmbedder:
    """`EmbedderClient`: an image's first pixel's red value picks a gallery vector (a known answer)."""

    remote = True

    def __init__(self, vectors: np.ndarray, version: str) -> None:
        self.vectors = vectors
        self.version = version

    async def embed(self, image_bytes: bytes, index_version: str) -> np.ndarray:
        pixel = decode_image(image_bytes).getpixel((0, 0))
        assert isinstance(pixel, tuple)
        return np.asarray(self.vectors[pixel[0] % len(self.vectors)])

    async def embed_text(self, text: str, index_version: str) -> np.ndarray:
        return np.asarray(self.vectors[0])

    async def loaded_versions(self) -> list[str]:
        return [self.version]


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The HTTP API over uvicorn on 127.0.0.1, requiring the query token ``TOKEN``; yields its URL."""
    import uvicorn

    from retrieval.serving.clients import LocalShardClient
    from retrieval.serving.http import build_http_api
    from retrieval.serving.service import SearchService
    from retrieval.serving.shard_host import ShardHost

    vectors = np.random.default_rng(8).standard_normal((20, 8)).astype(np.float32)
    # Unit vectors: each item is its own best match, so an image of id 13 finds item 13 first.
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    root = tmp_path_factory.mktemp("token-index")
    build_shards(
        vectors=vectors,
        ids=np.arange(20),
        items=[{"label": f"class {item_id % 4}"} for item_id in range(20)],
        out_root=root,
        num_shards=2,
        model=ModelRef(name="pixels", version="7", uri="models:/pixels/7"),
        gallery={"dataset": "random"},
        thumbnails=[png_bytes(seed=item_id, size=12) for item_id in range(20)],
    )
    manifest, _ = read_manifest(root)
    spec = ServingSpec(index=str(root), max_k=10, default_k=3, query_token_env=TOKEN_ENV)
    # The local layout: the shards in this process, searched on a thread pool.
    host = ShardHost(spec=spec)
    host.prepare(str(root))
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    shards = [LocalShardClient(host, info.shard, executor) for info in manifest.shards]
    embedder = PixelEmbedder(vectors, manifest.index_version)
    service = SearchService(manifest=manifest, spec=spec, shards=shards, embedder=embedder)
    os.environ[TOKEN_ENV] = TOKEN
    server = uvicorn.Server(uvicorn.Config(build_http_api(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        executor.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def test_the_page_asks_for_the_query_token_and_sends_it(token_server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert requests.get(f"{token_server}/version", timeout=10).status_code == 401
    browser.get(f"{token_server}/")
    wait = WebDriverWait(browser, PAGE_WAIT_S)
    token_form = browser.find_element(By.ID, "token-form")
    wait.until(lambda _: token_form.is_displayed())
    assert browser.find_element(By.ID, "error").get_attribute("data-type") == "unauthorized"

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    token_form.find_element(By.TAG_NAME, "button").click()
    served = browser.find_element(By.ID, "served")
    wait.until(lambda _: served.get_attribute("data-index-version"))
    assert "pixels version 7" in served.text
    assert not browser.find_element(By.ID, "error").is_displayed()

    query = tmp_path / "query.png"
    image = Image.new("RGB", (8, 8), color=(13, 0, 0))
    image.save(query, format="PNG")
    search_with_file(browser, query, k=4)
    cards = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#results li.card") or None)
    assert len(cards) == 4 and cards[0].get_attribute("data-id") == "13"
    # The thumbnails are fetched with the token too (an <img src> could not carry it).
    wait.until(lambda _: all(card.get_attribute("data-thumbnail") for card in cards))
    assert [card.get_attribute("data-thumbnail") for card in cards] == ["loaded"] * 4
    assert browser.execute_script("return sessionStorage.getItem('retrieval.query-token');") == TOKEN
