"""`--mode serve` for real: its uvicorn server on a free port of 127.0.0.1 (in a thread: a subprocess would cost
the suite ~10 s of imports), searched over HTTP and from the page in a headless Chromium (skipped where Debian's
chromium and chromium-driver are not installed). `python main.py --mode serve` itself runs in
docs/make_catalogue_page_screenshot.py; here its wiring is checked without serving.

The index is the one tests/test_catalogue.py builds: a dozen generated demo images, the tiny random backbone.
"""

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import main
from catalogue import Catalogue, service
from conftest import load_docs_script
from test_catalogue import write_run

MAX_UPLOAD_BYTES = 300_000  # the server's limit here
REQUEST_S = 30  # generous: the CI machine is shared


# docs/make_catalogue_page_screenshot.py: the server and browser helpers the docs picture is made with.
page_helpers = load_docs_script("make_catalogue_page_screenshot")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, index folder): `--mode serve`'s server on the index test_catalogue.py builds, stopped at the end."""
    base = tmp_path_factory.mktemp("service")
    checkpoint = write_run(base / "run", base / "demo")
    assert main.main(["--mode", "index", "--index", str(base / "index"), "--checkpoint", str(checkpoint)]) == 0
    http = service.http_server(Catalogue.load(base / "index", device="cpu"), max_upload_bytes=MAX_UPLOAD_BYTES)
    listening = socket.create_server(("127.0.0.1", 0))  # a free port, held from the start: no race
    thread = threading.Thread(target=http.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + REQUEST_S
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}", base / "index"
    finally:
        http.should_exit = True
        thread.join(timeout=REQUEST_S)
        listening.close()
        assert not thread.is_alive(), "the server did not stop"


def test_serve_loads_the_model_first_and_binds_this_machine_only_by_default(server, monkeypatch, capsys):
    _, index = server
    arguments = main.parse_arguments(["--mode", "serve", "--index", str(index), "eval.device=cpu"])
    assert (arguments.host, arguments.port) == ("127.0.0.1", 8000)
    served = []
    monkeypatch.setattr("uvicorn.Server.run", lambda http, sockets=None: served.append(http))
    assert main.run_mode(arguments, main.resolve_config(arguments)) == 0
    (http,) = served
    assert (http.config.host, http.config.port) == ("127.0.0.1", 8000)
    assert f"serving {index} (12 items, flat) at http://127.0.0.1:8000/" in capsys.readouterr().out

    arguments = main.parse_arguments(["--mode", "serve", "--index", str(index), "--host", "0.0.0.0", "--port", "9",
                                      "eval.device=cpu"])
    assert main.run_mode(arguments, main.resolve_config(arguments)) == 0
    assert (served[1].config.host, served[1].config.port) == ("0.0.0.0", 9)
    assert "no authentication" in capsys.readouterr().err


def upload(url, content: bytes, name="photo.png", k=5) -> httpx.Response:
    return httpx.post(f"{url}/search", params={"k": k}, files={"image": (name, content)}, timeout=REQUEST_S)


def png_bytes(picture: Image.Image) -> bytes:
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    return encoded.getvalue()


def query_image(index) -> Path:
    return Path(Catalogue.load(index).items[5]["path"])


def test_results_equal_the_command_lines(server, capsys):
    url, index = server
    image = query_image(index)
    response = upload(url, image.read_bytes(), name=image.name)
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["query"] == image.name

    capsys.readouterr()
    assert main.main(["--mode", "search", "--index", str(index), "--query", str(image), "--top-k", "5"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(served["results"]) == len(printed) == 5
    for row, line in zip(served["results"], printed):
        assert list(row) == list(line) == ["query", "rank", "id", "path", "label", "score"]
        assert {**row, "query": None, "score": None} == {**line, "query": None, "score": None}
        assert row["score"] == pytest.approx(line["score"], abs=2e-6)  # both rounded to 6 decimals
    assert served["results"][0]["path"] == str(image)  # an indexed image finds itself first

    # a click on the page: search by an item's stored vector
    by_id = httpx.get(f"{url}/search/{printed[1]['id']}", params={"k": 3}, timeout=REQUEST_S).json()
    assert by_id["results"][0]["id"] == printed[1]["id"] and by_id["results"][0]["score"] == pytest.approx(1, abs=1e-5)


def decompression_bomb(side: int) -> bytes:
    """A PNG of a few KB that decodes to side x side pixels."""
    return png_bytes(Image.new("1", (side, side)))


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    content = png_bytes(Image.fromarray(noise))
    return content[:len(content) // 2]


@pytest.mark.parametrize("make_content, status, words", [
    (lambda: b"", 400, "empty"),
    (lambda: b"name,price\nlamp,12\n", 415, "not an image"),
    (truncated_png, 422, "truncated"),
    (lambda: b"\xff" * (MAX_UPLOAD_BYTES + 100_000), 413, "too large"),
    (lambda: decompression_bomb(8_000), 413, "decompression bomb"),  # 64 MP: above the server's own limit
    (lambda: decompression_bomb(12_000), 413, "decompression bomb"),  # 144 MP: above PIL's
], ids=["empty", "text", "truncated", "too_many_bytes", "too_many_pixels", "pil_bomb_limit"])
def test_bad_uploads_get_a_4xx_and_the_next_search_works(server, make_content, status, words):
    url, index = server
    response = upload(url, make_content())
    assert response.status_code == status, response.text
    assert words in response.text.lower()
    assert upload(url, query_image(index).read_bytes()).status_code == 200


def test_requests_without_an_image_or_outside_the_index_get_a_4xx(server):
    url, _ = server
    assert httpx.post(f"{url}/search", timeout=REQUEST_S).status_code == 422
    assert httpx.get(f"{url}/search/999", timeout=REQUEST_S).status_code == 404
    assert httpx.get(f"{url}/image/999", timeout=REQUEST_S).status_code == 404
    for not_an_id in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "0.jpg"):  # only ids name files
        assert httpx.get(f"{url}/image/{not_an_id}", timeout=REQUEST_S).status_code in (404, 422)
    thumbnail = httpx.get(f"{url}/image/0", timeout=REQUEST_S)
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"


def test_a_burst_of_concurrent_searches_all_succeed(server):
    url, index = server
    content = query_image(index).read_bytes()
    expected = upload(url, content).json()["results"]

    def search(number: int):
        if number % 2:
            return httpx.get(f"{url}/search/{number % 12}", params={"k": 5}, timeout=REQUEST_S)
        return upload(url, content)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(search, range(16)))
    assert [response.status_code for response in responses] == [200] * 16
    assert all(response.json()["results"] == expected for response in responses[::2])
    health = httpx.get(f"{url}/health", timeout=REQUEST_S).json()
    assert health["status"] == "ok" and health["items"] == len(Catalogue.load(index))


def test_items_added_and_removed_from_the_command_line_are_served_at_once(server, tmp_path):
    url, index = server
    new_image = tmp_path / "new_product.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(new_image)
    assert main.main(["--mode", "add", "--index", str(index), "--images", str(new_image)]) == 0
    new_id = max(item["id"] for item in Catalogue.load(index).items)
    found = upload(url, new_image.read_bytes(), k=1).json()["results"][0]
    assert found["id"] == new_id and found["path"] == str(new_image)
    assert httpx.get(f"{url}/image/{new_id}", timeout=REQUEST_S).status_code == 200

    assert main.main(["--mode", "remove", "--index", str(index), "--ids", str(new_id)]) == 0
    assert upload(url, new_image.read_bytes(), k=1).json()["results"][0]["id"] != new_id
    assert httpx.get(f"{url}/image/{new_id}", timeout=REQUEST_S).status_code == 404


# ---- the page, in a real browser ------------------------------------------------------------------------
def test_the_page_searches_by_an_uploaded_photo_then_by_a_clicked_result(server, tmp_path):
    if not (page_helpers.CHROMIUM and page_helpers.CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, index = server
    image = query_image(index)
    with page_helpers.chromium(REQUEST_S) as browser:
        uploaded, clicked = page_helpers.search_on_page(browser, url, image, click=3, timeout_s=REQUEST_S)
        assert uploaded == [row["id"] for row in upload(url, image.read_bytes(), k=12).json()["results"]]
        assert clicked == [row["id"] for row in httpx.get(f"{url}/search/{uploaded[3]}", params={"k": 12},
                                                          timeout=REQUEST_S).json()["results"]]
        first_card = browser.find_element(By.CSS_SELECTOR, "#results .result")
        assert "label" in first_card.text and first_card.find_element(By.CSS_SELECTOR, ".score").text == "1.000"
        assert not browser.find_element(By.ID, "error").is_displayed()

        # a bad upload shows the server's message, and the page still works
        (tmp_path / "notes.txt").write_text("not a photo")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
        WebDriverWait(browser, REQUEST_S).until(lambda _: browser.find_element(By.ID, "error").is_displayed())
        assert "415: not an image" in browser.find_element(By.ID, "error").text
        browser.save_screenshot(str(tmp_path / "catalogue_page.png"))
    assert Image.open(tmp_path / "catalogue_page.png").size[0] == page_helpers.WINDOW[0]
