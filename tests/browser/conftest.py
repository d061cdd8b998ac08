"""A real headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

When the browser is missing, scripts/ensure_test_tools.sh installs it (apt-get, as root); where it
cannot, the browser tests fail with a message that says what to install. Screenshots go to
$SD_SCREENSHOT_DIR when set (to look at them), else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.support.api_process import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Flags for a sandboxed CI machine: no GPU, no network but loopback, no first-run or sync traffic.
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def ensure_browser() -> None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "ensure_test_tools.sh")], check=False, timeout=900
        )
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing and could not be installed: "
            "apt-get install chromium chromium-driver (Debian/Ubuntu)"
        )


@pytest.fixture(scope="session")
def browser() -> Iterator[webdriver.Chrome]:
    ensure_browser()
    profile = tempfile.mkdtemp(prefix="sd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1366,800"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SD_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
