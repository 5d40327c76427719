"""Screenshot of the playground's compare view on a running server (headless Chromium via selenium).

    persona-router serve --port 8123 &            # any running server on loopback
    python benchmarks/compare_screenshot.py --url http://127.0.0.1:8123 \
        --arm student:live --arm clinician:none --out benchmarks/results/compare_view.png

Each ``--arm`` is ``PERSONA:ADAPTER`` (ADAPTER: ``live``, ``none`` or a version number; an empty persona lets
the router infer it). Writes the PNG and prints what both arms showed as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

QUESTION = "How do vaccines train the immune system?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--arm", action="append", required=True, help="PERSONA:ADAPTER, given twice")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.arm) != 2:
        parser.error("give --arm twice")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(args.url + "/")
        wait = WebDriverWait(driver, 900)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#arm0-persona option")) > 1)
        driver.find_element(By.ID, "cmp-question").send_keys(args.question)
        for i, arm in enumerate(args.arm):
            persona, _, adapter = arm.partition(":")
            Select(driver.find_element(By.ID, f"arm{i}-persona")).select_by_value(persona)
            Select(driver.find_element(By.ID, f"arm{i}-adapter")).select_by_value(adapter or "live")
        tokens = driver.find_element(By.ID, "cmp-max-tokens")
        tokens.clear()
        tokens.send_keys(str(args.max_tokens))
        driver.find_element(By.ID, "cmp-send").click()
        wait.until(lambda d: d.find_element(By.ID, "cmp-status").get_attribute("textContent").startswith(
            ("done", "error")))
        driver.execute_script("document.getElementById('compare').scrollIntoView()")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        shown = []
        for i in range(2):
            box = driver.find_element(By.ID, f"arm{i}")
            shown.append({"answer": box.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent"),
                          **{dd.get_attribute("data-key"): dd.get_attribute("textContent")
                             for dd in box.find_elements(By.CSS_SELECTOR, "dd[data-key]")}})
        status = driver.find_element(By.ID, "cmp-status").get_attribute("textContent")
        json.dump({"status": status, "arms": shown}, sys.stdout, indent=2)
        print()
        return 0 if status.startswith("done") else 1
    finally:
        driver.quit()


if __name__ == "__main__":
    raise SystemExit(main())
