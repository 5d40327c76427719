"""The try-it page at ``/`` in headless Chromium (selenium + Debian's chromium and chromium-driver).

Skipped where the browser, its driver or selenium is missing (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
QUESTION = "why is the sky blue?"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("adapters-page")
    AdapterFactory(tiny_model_dir, root).publish("student", seed=1)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0)
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def ask_on_page(browser: Any, url: str, persona: str, max_tokens: int) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#persona option")) == 6)
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    Select(browser.find_element(By.ID, "persona")).select_by_value(persona)
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("textContent").startswith(("done", "error")))
    decision = {dd.get_attribute("data-key"): dd.get_attribute("textContent")
                for dd in browser.find_elements(By.CSS_SELECTOR, "#decision dd[data-key]")}
    return {"answer": browser.find_element(By.ID, "answer").get_attribute("textContent"),
            "status": browser.find_element(By.ID, "status").get_attribute("textContent"), **decision}


def test_page_streams_the_answer_and_shows_the_decision(browser: Any, server: RunningServer) -> None:
    with server.client() as client:
        expected = answer(client, QUESTION, persona="student", max_new_tokens=8)
    shown = ask_on_page(browser, server.url, "student", 8)
    assert shown["status"].startswith("done"), shown
    assert shown["answer"].strip() == expected["answer"]
    assert shown["persona"] == "student" and shown["source"] == "explicit"
    assert shown["adapter"] == "student v1"


def test_page_auto_persona_shows_fallback_reason(browser: Any, server: RunningServer) -> None:
    shown = ask_on_page(browser, server.url, "", 4)
    assert shown["status"].startswith("done"), shown
    assert shown["persona"] == "general-reader" and shown["source"] == "fallback"
    assert "classifier" in shown["reason"] and shown["adapter"] == "none (prompt-only)"


def test_page_lists_personas_with_their_status(browser: Any, server: RunningServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#persona option")) == 6)
    labels = [o.get_attribute("textContent") for o in browser.find_elements(By.CSS_SELECTOR, "#persona option")]
    assert labels[0].startswith("auto") and "student (adapter v1)" in labels and "clinician (prompt-only)" in labels


def test_compare_view_shows_both_arms_side_by_side(browser: Any, server: RunningServer,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Adapter against prompt: both answers, their decisions, speed and the judge's verdict; a screenshot
    goes to ``$PERSONA_ROUTER_SCREENSHOTS`` when set (the committed one is made on the demo server)."""
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with server.client() as client:
        expected = [answer(client, QUESTION, persona="student", max_new_tokens=8, adapter=choice)["answer"]
                    for choice in ("live", "none")]
    browser.set_window_size(1400, 1100)
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 180)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#arm0-persona option")) == 6)
    browser.find_element(By.ID, "cmp-question").send_keys(QUESTION)
    for arm, adapter in (("arm0", "live"), ("arm1", "none")):
        Select(browser.find_element(By.ID, f"{arm}-persona")).select_by_value("student")
        Select(browser.find_element(By.ID, f"{arm}-adapter")).select_by_value(adapter)
    tokens = browser.find_element(By.ID, "cmp-max-tokens")
    tokens.clear()
    tokens.send_keys("8")
    browser.find_element(By.ID, "cmp-send").click()
    wait.until(lambda d: d.find_element(By.ID, "cmp-status").get_attribute("textContent").startswith(("done", "error")))
    assert browser.find_element(By.ID, "cmp-status").get_attribute("textContent").startswith("done")
    shown = []
    for arm in ("arm0", "arm1"):
        box = browser.find_element(By.ID, arm)
        rows = {dd.get_attribute("data-key"): dd.get_attribute("textContent")
                for dd in box.find_elements(By.CSS_SELECTOR, "dd[data-key]")}
        shown.append({"answer": box.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent"), **rows})
    assert [arm["answer"].strip() for arm in shown] == [text.strip() for text in expected]
    assert shown[0]["adapter"] == "student v1" and shown[1]["adapter"] == "none (prompt-only)"
    for arm in shown:
        assert arm["persona"] == "student (explicit)" and float(arm["tokens/s"].split()[0]) > 0
        assert arm["judge"].startswith("sounds like ") and 0 <= float(arm["adherence"]) <= 1
    folder = Path(os.environ.get("PERSONA_ROUTER_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(folder / "compare_view.png"))
