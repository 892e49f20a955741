"""Write docs/catalogue_page.png: `--mode serve` on an index, its page in headless Chromium, a photo uploaded,
then a result clicked (what tests/test_service.py checks, with the same helpers).

    python main.py --mode demo                                  # models_ckpt/demo/best.pt
    python main.py --mode index --config configs/demo.yaml --index models_ckpt/demo/index
    python docs/make_catalogue_page_screenshot.py --index models_ckpt/demo/index \
        --query .cache/demo_sop/images/0057/00.jpg [--click 3] [--output docs/catalogue_page.png]

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and selenium
(requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WINDOW = (1200, 900)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(index: Path, *overrides: str, startup_s: float = 120):
    """`python main.py --mode serve --index INDEX` on a free port of 127.0.0.1 until the block ends: yields its URL.

    Waits (at most `startup_s`) for /health; raises RuntimeError with the server's output if it exits first.
    """
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "main.py", "--mode", "serve", "--index", str(index), "--port",
                                    str(port), *overrides], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while not answers(f"{url}/health"):
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer from {url}/health within {startup_s:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)  # not SIGINT: shells start background jobs with SIGINT ignored
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def chromium(timeout_s: float = 30):
    """A headless Chromium driven by selenium through Debian's chromium-driver."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(timeout_s)
    try:
        yield driver
    finally:
        driver.quit()


def shown_results(driver) -> tuple[list[int], bool]:
    """(ids of the result cards, in order; whether every thumbnail has loaded)."""
    from selenium.webdriver.common.by import By

    cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
    loaded = driver.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    return [int(card.get_attribute("data-id")) for card in cards], loaded


def search_on_page(driver, url: str, image: Path, click: int, timeout_s: float = 30) -> tuple[list[int], list[int]]:
    """Open the page, upload `image`, wait for the thumbnails, click result number `click` (0 = first), wait again.

    Returns the result ids after the upload and after the click.
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout_s)
    driver.get(url)
    wait.until(lambda _: "items" in driver.find_element(By.ID, "status").text)
    driver.find_element(By.ID, "file").send_keys(str(Path(image).resolve()))
    wait.until(lambda _: all(shown_results(driver)))
    uploaded = shown_results(driver)[0]
    driver.find_elements(By.CSS_SELECTOR, "#results .result")[click].click()
    wait.until(lambda _: f"item {uploaded[click]}" in driver.find_element(By.ID, "query-caption").text)
    wait.until(lambda _: all(shown_results(driver)) and shown_results(driver)[0][0] == uploaded[click])
    # The pointer and the focus stay on the card that was clicked, now showing another item: move them away.
    driver.execute_script("document.activeElement.blur()")
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "header")).perform()
    return uploaded, shown_results(driver)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True, help="the photo to upload")
    parser.add_argument("--click", type=int, default=3, help="which result to click, 0 = the first")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "catalogue_page.png")
    args = parser.parse_args()
    if not (CHROMIUM and CHROMEDRIVER):
        sys.exit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    with serving(args.index, "eval.device=cpu") as url, chromium() as driver:
        search_on_page(driver, url, args.query, args.click)
        driver.save_screenshot(str(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
