"""The web page as a person uses it (issue #25): a real headless browser (Debian's ``chromium``
+ ``chromium-driver``, driven by ``selenium``) against ``densediff app``'s page served on
loopback. It uploads an image, waits for the result, moves the step slider, checks that the
pictures shown are ``Predictor.predict``'s (pixel for pixel: the mask over the image and the
chosen step's mask) and saves a screenshot of the page (a test artifact:
``<tmp>/app_page.png``, and the path in ``$DENSEDIFF_APP_SCREENSHOT`` when set) showing the
class legend, the uncertainty map and the step slider.

Optional: it skips cleanly without Gradio, selenium, chromium or chromedriver.
``$DENSEDIFF_APP_CHECKPOINT`` serves that checkpoint instead of the session's tiny run
(for a screenshot of a trained model)."""

import base64
import io
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

import densediff
from densediff.viz import colorize

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    if not CHROMIUM or not DRIVER:
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1150", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(driver, what, timeout=60.0):
    """Poll ``what(driver)`` until it returns something other than None or False (or fail
    after ``timeout``); returns that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = what(driver)
        except Exception:  # noqa: BLE001 (elements come and go while Gradio renders)
            value = None
        if value is not None and value is not False:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for the page ({what.__name__})")


def _shown_pixels(driver, elem_id: str) -> np.ndarray:
    """The picture an ``<img>`` under ``#elem_id`` shows, fetched by the browser itself."""
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const img = document.querySelector('#' + arguments[0] + ' img');
        fetch(img.src).then(r => r.blob()).then(b => {
            const fr = new FileReader(); fr.onload = () => done(fr.result); fr.readAsDataURL(b);
        }).catch(e => done('error: ' + e));""", elem_id)
    assert data.startswith("data:"), data
    raw = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _in_view(driver, elem) -> bool:
    """Whether ``elem`` is displayed and inside the window (so the screenshot shows it)."""
    rect = elem.rect
    w, h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    return elem.is_displayed() and rect["width"] > 0 and rect["y"] >= 0 and \
        rect["y"] + rect["height"] <= h + 1 and rect["x"] + rect["width"] <= w + 1


def test_browser_upload_slider_matches_predict_and_screenshot(browser, tiny_ddp_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from densediff.app import build_app

    source = os.environ.get("DENSEDIFF_APP_CHECKPOINT") or str(tiny_ddp_run)
    predictor = densediff.load(source)
    rng = np.random.default_rng(0)
    image = tmp_path / "street.png"
    if os.environ.get("DENSEDIFF_APP_IMAGE"):
        shutil.copy(os.environ["DENSEDIFF_APP_IMAGE"], image)
    else:
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    app = build_app(predictor, source=source, examples=[image])
    url = app.launch("127.0.0.1", _free_port(), block=False, quiet=True)
    try:
        driver = browser
        driver.get(url)
        upload = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR,
                                                        "#upload input[type=file]"))
        upload.send_keys(str(image))  # as a person picking the file
        status = _wait(driver, lambda d: d.find_element(By.ID, "status") if "mask after" in
                       d.find_element(By.ID, "status").text else None)
        n = predictor.model.default_steps
        pred = predictor.predict(str(image), steps=n, seed=0)
        assert f"mask after {n} steps" in status.text and "error" not in status.text
        shown = _wait(driver, lambda d: _shown_pixels(d, "prediction"))
        assert np.array_equal(shown, pred.overlay), "the page shows another mask"
        legend = driver.find_element(By.ID, "prediction-key")
        assert all(name in legend.text for name in predictor.class_names), legend.text
        assert np.array_equal(_shown_pixels(driver, "uncertainty"),
                              pred.uncertainty_view().image)
        assert "label changed" in driver.find_element(By.ID, "uncertainty-key").text
        # move the step slider one step back, with the keyboard, as a person would
        slider = driver.find_element(By.CSS_SELECTOR, "#step-slider input[type=range]")
        assert slider.get_attribute("max") == str(n) and slider.get_attribute("value") == str(n)
        slider.click()
        slider.send_keys(Keys.END, Keys.LEFT)
        want = colorize(pred.trajectory[n - 2], predictor.palette)
        _wait(driver, lambda d: np.array_equal(_shown_pixels(d, "step-picture"), want) or None)
        label = driver.find_element(By.ID, "step-picture").text
        assert f"step {n - 1} of {n}" in label, label
        # the screenshot shows the legend, the uncertainty map and the step slider
        driver.execute_script("window.scrollTo(0, 0)")
        for elem_id in ("prediction-key", "uncertainty", "uncertainty-key", "step-slider",
                        "step-picture"):
            assert _in_view(driver, driver.find_element(By.ID, elem_id)), elem_id
        shot = tmp_path / "app_page.png"
        assert driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        print(f"screenshot: {shot}")
        if os.environ.get("DENSEDIFF_APP_SCREENSHOT"):
            shutil.copy(shot, os.environ["DENSEDIFF_APP_SCREENSHOT"])
    finally:
        app.close()
