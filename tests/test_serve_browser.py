"""``clipcl serve``'s page in a real headless browser: choose an image, read its top class from the page.

Needs selenium and a Chromium with its chromedriver (Debian: ``apt-get install chromium chromium-driver``); skipped
only where those are absent. Nothing is downloaded: the system chromedriver is named explicitly, so selenium's own
driver manager never runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import ServerProcess, image_files, post_images, trained_workspace

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no chromium and chromedriver on this machine")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,1400", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_page_answers_an_uploaded_image(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                            browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.wait import WebDriverWait

    ws = trained_workspace(tmp_path, tiny_config, tiny_weights)
    server = ServerProcess(ws, tmp_path / "logs")
    try:
        green = image_files(tmp_path / "images", ["green"], per_colour=1)[0]
        expected = post_images(server.client, [green], top_k=5).json()[0]["top"]

        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#tasks tbody tr")))
        task_row = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr td")]
        assert task_row[:3] == ["1", "a", "green, red"]

        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(green))
        top = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#result tr.top-class td.class")))
        assert top.text == expected[0]["class"] == "green"
        rows = browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")
        assert [row.find_element(By.CSS_SELECTOR, "td.class").text for row in rows] == [s["class"] for s in expected]
        assert "1 (a)" in rows[0].text
        assert "answered by the state of 1 task " in browser.find_element(By.ID, "status").text
        wait.until(lambda driver: driver.find_element(By.ID, "plot-section").is_displayed())
        if os.environ.get("CLIPCL_SCREENSHOT"):
            browser.save_screenshot(os.environ["CLIPCL_SCREENSHOT"])
    finally:
        server.stop()
