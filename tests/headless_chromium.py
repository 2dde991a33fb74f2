"""Headless Chromium for the tests that open a page: Debian's ``chromium`` driven through its
``chromedriver`` (package ``chromium-driver``) by selenium, with what the page logs and requests.

Never a downloaded browser build: the binaries are found on PATH (or /usr/bin) and given to selenium,
so Selenium Manager is never asked for one. Chromium runs with the flags below and a new empty
profile: without the background flags it reaches out to Google's hosts on its own, which would
drown the check that the page requests nothing from any other host. A proxy at a closed local port
makes any request that still tries the network fail at once."""
from __future__ import annotations

import json
import os
import shutil

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
# what never leaves the machine: the page's files and inline data, and the browser's own pages (its new-tab
# page loads chrome:// resources at start)
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "chrome-untrusted:", "devtools:")


def _which(*names):
    for n in names:
        found = shutil.which(n) or (f"/usr/bin/{n}" if os.access(f"/usr/bin/{n}", os.X_OK) else None)
        if found:
            return found
    return None


def find_chromium():
    return _which("chromium", "chromium-browser")


def find_chromedriver():
    return _which("chromedriver")


def start(user_data_dir, width=1400, height=1000):
    """A selenium WebDriver on a fresh headless Chromium whose profile is ``user_data_dir`` (new, empty)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver = find_chromium(), find_chromedriver()
    if chromium is None or driver is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    os.makedirs(user_data_dir, exist_ok=True)
    if os.listdir(user_data_dir):
        raise RuntimeError(f"{user_data_dir}: the profile folder must be new and empty")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.add_argument("--proxy-server=127.0.0.1:9")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def requests(driver):
    """``[(url, blocked)]`` of every request the page began since the last call (the DevTools Network
    log); ``blocked``: why the browser stopped it before it went out ("csp", ...), else None."""
    began, blocked = [], {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            began.append((msg["params"]["requestId"], msg["params"]["request"]["url"]))
        elif msg.get("method") == "Network.loadingFailed" and msg["params"].get("blockedReason"):
            blocked[msg["params"]["requestId"]] = msg["params"]["blockedReason"]
    return [(url, blocked.get(rid)) for rid, url in began]


def requested_urls(driver):
    """Every URL the page asked for since the last call, blocked or not."""
    return [url for url, _ in requests(driver)]


def console_errors(driver):
    """Console errors, uncaught exceptions and failed loads since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def not_local(urls):
    return [u for u in urls if not u.startswith(LOCAL_SCHEMES)]
