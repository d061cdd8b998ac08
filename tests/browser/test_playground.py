"""The playground at `/` in a real headless Chromium, against a real API process and a real worker with
the tiny model: type a prompt, submit, watch the progress (from the job's event stream; polling when the
stream fails), see the images with their seeds, as PNG or JPEG; validation errors next to their fields;
API key, queue position and cancel; tidy at laptop and phone widths."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from schemas.redis_keys import WORKERS_ZSET, worker_info_key
from tests.support import fake_worker
from tests.support.api import publish_worker
from tests.support.api_process import ApiProcess
from tests.support.input_images import encoded, init_picture
from tests.support.redis_server import RedisServer
from tests.support.service_stack import ServiceStack

PROMPT = "a red circle in the top left on a blue background"
JOB_POLL = re.compile(r"/v1/jobs/[0-9a-f]{32}$")  # GET of a job's status (not its events or images)
LAPTOP = (1366, 800)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, random_models: dict[str, Path]) -> Iterator[ServiceStack]:
    if redis_server.proc is None:
        redis_server.start()
    with ServiceStack(redis_server.url, random_models["sd1"]) as stack:
        yield stack


@pytest.fixture
def page(browser: WebDriver) -> Iterator[Callable[[str], WebDriver]]:
    """page(url): the playground freshly loaded, with an empty localStorage."""

    def open_page(url: str) -> WebDriver:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(url + "/")
        return browser

    yield open_page
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def wait_for(condition: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def text(browser: WebDriver, css: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, css).text


def fill(browser: WebDriver, **fields: object) -> None:
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def screenshot(browser: WebDriver, path: Path, width: int, height: int) -> None:
    """The whole page at a device width (mobile emulation for phones), saved as PNG."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    full_height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {**metrics, "height": max(height, int(full_height))}
    )
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))


def overflows_horizontally(browser: WebDriver) -> bool:
    return browser.execute_script(
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth"
    )


def test_prompt_to_images_with_live_progress(page, stack: ServiceStack, screenshot_dir: Path) -> None:
    browser = page(stack.url)
    wait_for(lambda: "model" in text(browser, "#server-status"), 30, "the model name")
    assert browser.find_element(By.ID, "key-panel").is_displayed() is False  # no key needed here
    fill(browser, prompt=PROMPT, negative_prompt="green", width=64, height=64, steps=40, seed=5, num_images=2)
    browser.find_element(By.ID, "generate").click()

    assert browser.find_element(By.ID, "preview").is_selected()  # offered: the server knows `preview`
    seen: list[str] = []
    preview_sizes: set[tuple[int, int]] = set()

    def images_loaded() -> bool:
        status = text(browser, "#status-text")
        if not seen or seen[-1] != status:
            seen.append(status)
        shown = browser.execute_script(
            "const p = document.getElementById('preview-image');"
            "return !p.hidden && p.complete && p.naturalWidth ? [p.naturalWidth, p.naturalHeight] : null;"
        )
        if shown:
            if not preview_sizes:  # the running state, once, to look at
                browser.save_screenshot(str(screenshot_dir / "playground-running-laptop.png"))
            preview_sizes.add(tuple(shown))
        return browser.execute_script(
            "const imgs = [...document.querySelectorAll('img.result')];"
            "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);"
        )

    wait_for(images_loaded, 120, "two images")
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [url for url in fetched if JOB_POLL.search(url)], "the page polled instead of listening"
    steps = [int(m[1]) for s in seen if (m := re.match(r"Running: step (\d+) of 40", s))]
    assert any(0 < step < 40 for step in steps), f"no progress seen mid-run: {seen}"
    assert steps == sorted(steps)
    assert text(browser, "#status-text") == "Done: 40 steps"
    assert preview_sizes == {(8, 8)}, "no live preview shown while it ran"  # the latent of 64x64
    assert not browser.find_element(By.ID, "preview-image").is_displayed()  # gone once the images are in

    sizes = browser.execute_script(
        "return [...document.querySelectorAll('img.result')].map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[64, 64], [64, 64]]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .seed")] == ["seed 5", "seed 6"]
    links = browser.find_elements(By.CSS_SELECTOR, ".card a.download")
    assert [a.get_attribute("download") for a in links] == ["sdserve-5.png", "sdserve-6.png"]
    assert all(a.get_attribute("href").startswith("blob:") for a in links)
    png_magic = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done([...new Uint8Array(b.slice(0, 8))]));",
        links[0].get_attribute("href"),
    )
    assert bytes(png_magic) == b"\x89PNG\r\n\x1a\n"
    assert not browser.find_element(By.ID, "cancel").is_displayed()

    screenshot(browser, screenshot_dir / "playground-laptop.png", *LAPTOP)
    assert not overflows_horizontally(browser)
    screenshot(browser, screenshot_dir / "playground-phone.png", *PHONE)
    assert not overflows_horizontally(browser)

    browser.find_elements(By.CSS_SELECTOR, ".card button.reuse")[1].click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "6"
    assert browser.find_element(By.ID, "num_images").get_attribute("value") == "1"
    assert "Seed 6 set" in text(browser, "#message")


def test_polling_when_the_event_stream_fails_and_a_jpeg(page, stack: ServiceStack) -> None:
    """A proxy that breaks streams (here: every fetch of /events rejected): the page polls instead."""
    browser = page(stack.url)
    browser.execute_script(
        "const real = window.fetch;"
        "window.fetch = (url, init) => String(url).endsWith('/events') ? Promise.reject(new TypeError('no')) : real(url, init);"
    )
    wait_for(lambda: "model" in text(browser, "#server-status"), 30, "the model name")
    fill(browser, prompt=PROMPT, width=64, height=64, steps=12, seed=9)
    browser.find_element(By.CSS_SELECTOR, "#output_format option[value=jpeg]").click()
    browser.find_element(By.ID, "generate").click()
    wait_for(
        lambda: browser.execute_script(
            "const i = document.querySelector('img.result'); return i && i.complete && i.naturalWidth > 0;"
        ),
        120,
        "the image",
    )
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [url for url in fetched if JOB_POLL.search(url)], "no poll: the fallback did not run"
    link = browser.find_element(By.CSS_SELECTOR, ".card a.download")
    assert link.get_attribute("download") == "sdserve-9.jpeg"
    magic = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done([...new Uint8Array(b.slice(0, 3))]));",
        link.get_attribute("href"),
    )
    assert bytes(magic) == b"\xff\xd8\xff"  # a JPEG


def test_img2img_with_a_mask_painted_over_the_image(
    page, stack: ServiceStack, tmp_path: Path, screenshot_dir: Path
) -> None:
    browser = page(stack.url)
    wait_for(lambda: "model" in text(browser, "#server-status"), 30, "the model name")
    init = tmp_path / "init.png"
    init.write_bytes(encoded(init_picture(64, 64)))
    browser.find_element(By.CSS_SELECTOR, "#image-panel summary").click()
    browser.find_element(By.ID, "init_image").send_keys(str(init))
    canvas = browser.find_element(By.ID, "mask-canvas")
    wait_for(
        lambda: canvas.get_attribute("width") == "64" and canvas.is_displayed(), 10, "the image's canvas"
    )
    # a stroke across the middle; the strength slider to 0.5
    ActionChains(browser).move_to_element_with_offset(canvas, -12, -12).click_and_hold().move_by_offset(
        24, 24
    ).release().perform()
    browser.execute_script(
        "const s = document.getElementById('strength'); s.value = '0.5'; s.dispatchEvent(new Event('input'))"
    )
    assert text(browser, "#strength-value") == "0.50"
    fill(browser, prompt=PROMPT, steps=4, seed=3)
    browser.find_element(By.ID, "generate").click()
    wait_for(
        lambda: browser.execute_script(
            "const i = document.querySelector('img.result'); return i && i.complete && i.naturalWidth === 64"
        ),
        60,
        "the result",
    )
    screenshot(browser, screenshot_dir / "playground-img2img-laptop.png", *LAPTOP)
    # the PNG's parameters: what the server was sent (a mask: "Mask blur" is written for inpainting only)
    parameters = browser.execute_async_script(
        "const done = arguments[0];"
        "fetch(document.querySelector('img.result').src).then(r => r.arrayBuffer())"
        ".then(b => done(new TextDecoder('latin1').decode(b)));"
    )
    assert "Denoising strength: 0.5, Mask blur: 4" in parameters


def test_validation_errors_are_shown_at_their_fields(page, stack: ServiceStack, screenshot_dir: Path) -> None:
    browser = page(stack.url)
    wait_for(lambda: "(1–150)" in text(browser, "[data-hint=steps]"), 30, "the bounds from /openapi.json")
    fill(browser, prompt=PROMPT, steps=151, guidance_scale=31)
    browser.find_element(By.ID, "generate").click()
    message = wait_for(lambda: text(browser, "#message"), 30, "an error message")
    assert message == "Please fix: Steps, Guidance."
    steps_error = text(browser, ".field[data-field=steps] .error")
    assert "less than or equal to 150" in steps_error
    assert "invalid" in browser.find_element(By.CSS_SELECTOR, ".field[data-field=steps]").get_attribute(
        "class"
    )
    assert "30" in text(browser, ".field[data-field=guidance_scale] .error")
    assert browser.find_elements(By.CSS_SELECTOR, "img.result") == []
    screenshot(browser, screenshot_dir / "playground-errors-phone.png", *PHONE)

    fill(browser, steps=10, guidance_scale=7.5)
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "generate").click()
    wait_for(lambda: text(browser, ".field[data-field=prompt] .error"), 30, "the prompt's error")
    assert "at least 1 character" in text(browser, ".field[data-field=prompt] .error")
    assert text(browser, ".field[data-field=steps] .error") == ""  # earlier errors are cleared


def test_api_key_queue_position_and_cancel(page, redis_server: RedisServer) -> None:
    idle_url = redis_server.url.rsplit("/", 1)[0] + "/3"  # no worker takes jobs queued here
    with redis.Redis.from_url(idle_url) as db:
        db.flushdb()
    fake_worker.serve(idle_url)  # a stand-in worker's info: jobs go to the fake model's queue, and wait
    with ApiProcess({"REDIS_URL": idle_url, "SD_API_KEYS": "browser-key"}) as api:
        browser = page(api.url)
        wait_for(lambda: browser.find_element(By.ID, "key-panel").is_displayed(), 30, "the API key field")
        assert text(browser, "#server-status") == "API key needed"
        fill(browser, **{"api-key": "browser-key"})
        browser.find_element(By.ID, "save-key").click()
        wait_for(lambda: "model fake-model" in text(browser, "#server-status"), 30, "the key accepted")
        assert browser.execute_script("return localStorage.getItem('sdserve.apiKey')") == "browser-key"

        fill(browser, prompt=PROMPT, steps=5)
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda: text(browser, "#status-text") == "Queued: next in line", 30, "the queue position")
        browser.find_element(By.ID, "cancel").click()
        wait_for(lambda: "Canceled" in text(browser, "#message"), 30, "the cancel")
        assert text(browser, "#message") == "Canceled at step 0 of 5."
        assert browser.find_element(By.ID, "generate").is_enabled()


def test_a_canceled_job_keeps_its_last_preview_marked_canceled(
    page, stack: ServiceStack, screenshot_dir: Path
) -> None:
    browser = page(stack.url)
    wait_for(lambda: "model" in text(browser, "#server-status"), 30, "the model name")
    fill(browser, prompt=PROMPT, width=64, height=64, steps=150, num_images=1)
    browser.find_element(By.ID, "generate").click()
    preview = browser.find_element(By.ID, "preview-image")
    wait_for(lambda: preview.is_displayed() and preview.get_attribute("src"), 60, "a live preview")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: "Canceled" in text(browser, "#message"), 30, "the cancel")
    assert preview.is_displayed() and "stopped" in preview.get_attribute("class")  # kept, greyed
    label = browser.find_element(By.ID, "preview-label")
    assert label.is_displayed() and re.fullmatch(r"canceled at step \d+ of 150", label.text), label.text
    assert browser.find_elements(By.CSS_SELECTOR, "img.result") == []  # never shown as a result
    assert not browser.find_element(By.ID, "warnings").is_displayed()  # a model that knows every word
    browser.save_screenshot(str(screenshot_dir / "playground-canceled-laptop.png"))


def test_the_jobs_warnings_under_the_picture(page, redis_server: RedisServer, screenshot_dir: Path) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/4"  # the stand-in worker runs the jobs queued here
    with redis.Redis.from_url(url) as db:
        db.flushdb()
    fake_worker.serve(url)
    with ApiProcess({"REDIS_URL": url}) as api:
        browser = page(api.url)
        wait_for(lambda: "model fake-model" in text(browser, "#server-status"), 30, "the model name")
        fill(browser, prompt=f"{fake_worker.WARN_PREFIX} a photo of a cat", steps=2)
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda: text(browser, "#status-text").startswith("Queued"), 30, "the job queued")
        fake_worker.run_queued_jobs(url)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "img.result"), 30, "the image")
        warnings = browser.find_element(By.ID, "warnings")
        assert warnings.is_displayed() and warnings.text == fake_worker.FAKE_WARNING
        browser.save_screenshot(str(screenshot_dir / "playground-warnings-laptop.png"))


def test_the_model_select_and_its_defaults(page, stack: ServiceStack) -> None:
    """A second model served: the select lists both, and the placeholders and the sampler default
    follow the one chosen (samplers it does not run are disabled)."""
    db = redis.Redis.from_url(stack.redis_url)
    publish_worker(
        db, name="other-gpu", model="other", native_width=768, native_height=640, default_sampler="euler",
        default_steps=25, samplers=["ddim", "euler"],
    )  # fmt: skip
    try:
        browser = page(stack.url)
        wait_for(lambda: "2 models" in text(browser, "#server-status"), 30, "both models")
        options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
        assert options == ["", "other", "sd1"]
        browser.find_element(By.CSS_SELECTOR, "#model option[value=sd1]").click()
        assert browser.find_element(By.ID, "width").get_attribute("placeholder") == "64 (default)"
        assert not browser.find_element(By.CSS_SELECTOR, "#sampler option[value=lcm]").get_attribute(
            "disabled"
        )
        browser.find_element(By.CSS_SELECTOR, "#model option[value=other]").click()
        assert browser.find_element(By.ID, "width").get_attribute("placeholder") == "768 (default)"
        assert browser.find_element(By.ID, "steps").get_attribute("placeholder") == "25 (default)"
        assert text(browser, "#sampler option[value='']") == "euler (model default)"
        assert browser.find_element(By.CSS_SELECTOR, "#sampler option[value=lcm]").get_attribute("disabled")
    finally:
        db.zrem(WORKERS_ZSET, "other-gpu")
        db.delete(worker_info_key("other-gpu"))
        db.close()
