"""A real headless Chromium for the browser tests (Debian's chromium + chromium-driver, which `make test`
installs; Selenium drives it through the local chromedriver, so nothing is downloaded)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(window: tuple[int, int] = (1280, 900)):
    """A headless Chromium WebDriver; quit on exit. Fails with the reason when the browser is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or CHROMEDRIVER
    if not Path(driver_path).is_file():
        raise RuntimeError(f"no chromedriver at {driver_path}: `make test` installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={window[0]},{window[1]}", "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
