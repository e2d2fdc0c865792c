"""The web demo in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against the app serving the demo checkpoints, as a user clicks through it.

Needs the demo extra (gradio), selenium (test extra) and Debian's chromium and chromium-driver;
without them the module is skipped with what to install. Screenshots are kept in the test's
output folder (pytest's tmp_path, printed on failure).
"""

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emu3 import demo

ROOT = Path(__file__).resolve().parents[2]
MISSING = [name for name, present in (
    ("gradio (pip install -r requirements-demo.txt)", importlib.util.find_spec("gradio")),
    ("selenium (pip install -r requirements-test.txt)", importlib.util.find_spec("selenium")),
    ("chromium (apt-get install chromium)", shutil.which("chromium")),
    ("chromedriver (apt-get install chromium-driver)", shutil.which("chromedriver"))) if not present]
if MISSING:
    pytest.skip(f"the browser test needs {', '.join(MISSING)}; .ci/run installs them when run as root",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

TIMEOUT = 300  # seconds for one generation on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_demo")
    env = {**os.environ, "EMU3_DEMO_DIR": str(root / "demo"), "GLOG_v": "3", "PYTHONPATH": str(ROOT),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    os.environ["EMU3_DEMO_DIR"] = env["EMU3_DEMO_DIR"]
    try:
        demo.demo_checkpoints()  # built here once, so the app starts fast
    finally:
        os.environ.pop("EMU3_DEMO_DIR")
    log = open(root / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "emu3.web.app", "--port", str(free_port()),
                                "--output-dir", str(root / "out")], env=env, stdout=subprocess.PIPE,
                               stderr=log, text=True)
    url = None
    deadline = time.time() + TIMEOUT
    while url is None and time.time() < deadline and process.poll() is None:
        line = process.stdout.readline()
        match = re.search(r"running at (http://\S+)", line)
        url = match[1] if match else None
    if url is None:
        process.kill()
        pytest.fail(f"the app did not start: {(root / 'server.log').read_text()[-3000:]}")
    yield url, root / "out"
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=TIMEOUT, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def load(driver, url):
    driver.get(url)
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#t2i-status"), timeout=60)


def text_of(driver, selector):
    """The text of a component; of a status line, its message alone (not gradio's timer over it)."""
    if selector.endswith("-status"):
        return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, f"{selector} [data-testid=markdown]"))
    return driver.find_element(By.CSS_SELECTOR, selector).text


def type_into(driver, selector, text):
    box = driver.find_element(By.CSS_SELECTOR, f"{selector} textarea, {selector} input")
    box.clear()
    box.send_keys(text)


def open_tab(driver, name):
    next(tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if name in tab.text).click()


def generate(driver, prompt, ratio):
    """Fill in and click Generate; returns every status line seen until Done."""
    before = text_of(driver, "#t2i-status")
    type_into(driver, "#t2i-prompt", prompt)
    type_into(driver, "#t2i-ratio", ratio)
    driver.find_element(By.CSS_SELECTOR, "#t2i-generate").click()
    seen = []

    def finished():
        status = text_of(driver, "#t2i-status")
        if status != before and (not seen or seen[-1] != status):
            seen.append(status)
        return bool(seen) and (seen[-1].startswith("Done") or "⚠" in seen[-1])

    wait_for(finished)
    return seen


def test_text_to_image_fills_in_and_downloads(server, browser, tmp_path):
    url, out = server
    load(browser, url)
    seen = generate(browser, "a red apple on a table", "2:1")
    assert seen[-1].startswith("Done: 88x48 pixels"), seen
    assert any(re.search(r"row \d/6, \d+/75 tokens, [\d.]+ tokens/s, \d+ s left", s) for s in seen), seen
    # The picture on the page has the generated size (2:1 at the demo's 64x64-pixel area: 6x11 tokens).
    image = browser.find_element(By.CSS_SELECTOR, "#t2i-image img")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [88, 48]
    link = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#t2i-file a"), timeout=30)
    assert link[0].text.endswith(".png") or link[0].get_attribute("href").endswith(".png")
    [png] = out.glob("*a_red_apple_on_a_table.png")
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (48, 88, 3) and pixels.std() > 0
    browser.save_screenshot(str(tmp_path / "text_to_image.png"))


def test_bad_input_shows_a_sentence(server, browser, tmp_path):
    url, _ = server
    load(browser, url)
    type_into(browser, "#t2i-ratio", "1:1")
    browser.find_element(By.CSS_SELECTOR, "#t2i-generate").click()
    assert "Type a prompt first" in wait_for(lambda: "⚠" in text_of(browser, "#t2i-status")
                                             and text_of(browser, "#t2i-status"), timeout=60)
    for ratio, message in (("abc", "ratio must be 'W:H' with two positive integers"),
                           ("1000:1", "is too small for ratio 1000:1")):
        seen = generate(browser, "a cat", ratio)
        assert message in seen[-1], seen
        assert "Traceback" not in browser.page_source
    browser.save_screenshot(str(tmp_path / "bad_ratio.png"))


def test_chat_answers_about_an_upload(server, browser, tmp_path):
    url, _ = server
    load(browser, url)
    open_tab(browser, "Chat about an image")
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    upload = browser.find_element(By.CSS_SELECTOR, "#chat-file input[type=file]")
    upload.send_keys(str(not_a_picture))
    assert "not a picture this demo can read" in wait_for(lambda: text_of(browser, "#chat-status"), timeout=60)

    picture = Image.linear_gradient("L").resize((96, 80)).convert("RGB")
    picture.save(tmp_path / "gradient.png")
    load(browser, url)
    open_tab(browser, "Chat about an image")
    browser.find_element(By.CSS_SELECTOR, "#chat-file input[type=file]").send_keys(str(tmp_path / "gradient.png"))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-preview img"), timeout=60)
    type_into(browser, "#chat-question", "What is in the picture?")
    browser.find_element(By.CSS_SELECTOR, "#chat-ask").click()
    wait_for(lambda: text_of(browser, "#chat-status").startswith("Done"))
    answer = browser.find_element(By.CSS_SELECTOR, "#chat-answer textarea").get_attribute("value")
    assert answer.strip(), "no answer text"
    browser.save_screenshot(str(tmp_path / "chat.png"))


def test_two_tabs_queue(server, browser, tmp_path):
    url, _ = server
    load(browser, url)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    load(browser, url)
    for handle, prompt in ((first, "a blue sky"), (second, "a green field")):
        browser.switch_to.window(handle)
        type_into(browser, "#t2i-prompt", prompt)
        type_into(browser, "#t2i-ratio", "1:1")
        browser.find_element(By.CSS_SELECTOR, "#t2i-generate").click()
    for handle in (second, first):
        browser.switch_to.window(handle)
        status = wait_for(lambda: re.match(r"Done|⚠", text_of(browser, "#t2i-status")) and
                          text_of(browser, "#t2i-status"))
        assert status.startswith("Done: 64x64 pixels"), status
    browser.save_screenshot(str(tmp_path / "first_tab.png"))
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)
