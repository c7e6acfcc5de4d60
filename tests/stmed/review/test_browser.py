"""The review page in a real browser (headless Chromium through chromedriver), used the way a clinician uses
it: sign in, decide three items by keyboard, star one, undo the last, reload, then read the database. The
page's screenshot is kept (the test's tmp dir, and ``$STMED_ARTEFACTS`` when set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stmed.review.server import HTTPConfig, start
from stmed.review.web import build
from tests.stmed.review.fixtures import queued_store
from tests.stmed.review.needs import need

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1440,900")


@pytest.fixture
def browser(tmp_path: Path):
    need(Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
         f"Chromium and chromedriver are not installed ({CHROMIUM}, {CHROMEDRIVER}: apt-get install chromium "
         "chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need(False, "selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_a_clinician_reviews_by_keyboard(tmp_path: Path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    store = queued_store(tmp_path, items=6)
    token = store.add_reviewer("Dr Rivera")
    app = start(build(store), HTTPConfig(port=0))
    wait = WebDriverWait(browser, 15)

    def at(count: str) -> None:  # the page shows this item and its image has loaded
        wait.until(lambda d: d.find_element(By.ID, "count").text == count
                   and d.execute_script("return document.getElementById('image').naturalWidth > 0"))

    def press(key: str) -> None:
        browser.switch_to.active_element.send_keys(key)

    try:
        browser.get(app.url + "/review")
        assert browser.current_url.endswith("/signin")
        browser.find_element(By.ID, "token").send_keys(token + Keys.ENTER)
        at("1 of 6")
        first_question = browser.find_element(By.ID, "question").text
        press("a")
        at("2 of 6")
        press("s")  # star this one, then prefer B
        assert browser.find_element(By.ID, "star").get_attribute("aria-pressed") == "true"
        press("b")
        at("3 of 6")
        press("c")
        press("Both answers miss the lesion.")  # typed into the correction box, which has the focus now
        press(Keys.ESCAPE)
        press("t")
        at("4 of 6")
        browser.save_screenshot(str(tmp_path / "review-page.png"))
        press("u")  # undo the tie: item 3 comes back
        at("3 of 6")
        browser.refresh()  # nothing is lost on reload; the page resumes at the same item
        at("3 of 6")
        assert browser.find_element(By.ID, "question").text
        assert "Undone" not in browser.find_element(By.ID, "status").text
    finally:
        app.stop()

    labels = store.labels()
    assert [row["shown"] for row in labels] == ["A", "B"]
    assert [row["starred"] for row in labels] == [False, True]
    assert labels[0]["question"] == first_question
    audit = [row["action"] for row in store.audit_rows()]
    assert audit.count("decide") == 3 and audit.count("undo") == 1 and audit.count("sign_in") == 1
    artefacts = os.environ.get("STMED_ARTEFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "review-page.png", Path(artefacts) / "review-page.png")
    assert (tmp_path / "review-page.png").stat().st_size > 10_000
