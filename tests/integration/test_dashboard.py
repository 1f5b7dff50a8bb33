"""The web dashboard in a real headless Chromium (Selenium) against the real services and
gateway on loopback: a bad form shows the gateway's error, a run created from a template
appears in the list, its detail page draws live loss curves from the SSE stream, and a
second run is cancelled with the button.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/setup.sh installs them in CI);
skipped without them, except where ``CI`` is set: there it fails.

    MLXU_DASHBOARD_SCREENSHOT=docs/dashboard.png uv run pytest tests/integration/test_dashboard.py

also saves a screenshot of the live run's page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServiceProcess, _kill_workers, free_port, write_jsonl
from tests.integration.test_gateway import BACKENDS, CHAT, Gateway

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
WAIT_S = 90


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (uv sync)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    why = _missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mlxu-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for failure reports
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    # The given driver binary: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    """The four services and the gateway, without API keys (loopback only), as
    `mlxu up` runs them on a workstation: the browser's EventSource follows the runs."""
    home = tmp_path_factory.mktemp("dashboard-home")
    data = tmp_path_factory.mktemp("dashboard-data")
    ports = {name: free_port() for name in BACKENDS}
    env = dict(os.environ)
    env.update({f"MLXU_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()})
    base = tmp_path_factory.getbasetemp().resolve()
    env.update(MLXU_HOME=str(home), MLXU_ALLOWED_ROOTS=os.pathsep.join([str(base), str(REPO)]))
    env.pop("MLXU_API_KEYS", None)
    env.pop("MLXU_API_KEYS_FILE", None)
    procs = [ServiceProcess(n, home, ports[n], env) for n in BACKENDS]
    gateway = Gateway(home, free_port(), env)
    errors: list[BaseException] = []

    def start(sp: ServiceProcess) -> None:
        try:
            sp.start(timeout=120)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(sp,)) for sp in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield gateway.start(), data
    finally:
        for p in [*(sp.proc for sp in procs), gateway.proc]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        _kill_workers(home)


def _wait(driver, what, timeout: float = WAIT_S):  # noqa: ANN001, ANN202
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(
            driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        )
        return wait.until(lambda d: what(d))
    except TimeoutException:
        console = "\n".join(e["message"] for e in driver.get_log("browser"))
        page = driver.find_element("css selector", "body").text
        raise AssertionError(
            f"timed out on {driver.current_url}\n--- page:\n{page}\n--- console:\n{console}"
        ) from None


def _css(driver, selector: str):  # noqa: ANN001, ANN202
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _click(driver, selector: str) -> bool:  # noqa: ANN001
    """Click the element, found afresh: the lists are re-drawn as they are polled."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        found = _css(driver, selector)
        if found:
            found[0].click()
        return bool(found)
    except StaleElementReferenceException:
        return False


def _fill(driver, values: dict[str, str]) -> None:  # noqa: ANN001
    for field_id, value in values.items():
        el = _css(driver, f"#{field_id}")[0]
        el.clear()
        if value:
            el.send_keys(value)


def _create(driver, url: str, values: dict[str, str]) -> str:  # noqa: ANN001
    """Fill the runs page's form and submit it; the new run's id."""
    driver.get(f"{url}/")
    _wait(driver, lambda d: _css(d, "#f-template option[value=efficient_llm]"))
    _css(driver, "#f-template option[value=efficient_llm]")[0].click()
    _fill(driver, values)
    _css(driver, "#f-submit")[0].click()
    return _wait(driver, lambda d: _css(d, "#create-status")[0].get_attribute("data-run-id"))


def _loss_points(driver) -> tuple[int, str]:  # noqa: ANN001
    """The most points any loss chart has, and the latest train_loss shown (read in one
    script: the page redraws these as events arrive)."""
    got = driver.execute_script(
        """const pts = [...document.querySelectorAll("[data-chart=loss]")]
             .map((c) => Number(c.dataset.points || 0));
           const m = document.querySelector("[data-metric=train_loss]");
           return [Math.max(0, ...pts), m ? m.textContent : ""];"""
    )
    return int(got[0]), str(got[1])


def _steps(n: int, report: int = 1, validate: int = 5) -> str:
    loop = {"max_steps": n, "steps_per_report": report, "steps_per_eval": validate}
    return json.dumps(
        {"stages": {"distill": {"distill": {"loop": loop}}, "sft": {"sft": {"loop": loop}}}}
    )


def test_dashboard_creates_follows_and_cancels_runs(
    browser,  # noqa: ANN001
    open_stack: tuple[Gateway, Path],
    tiny_model: Path,
) -> None:
    driver = browser
    gateway, data = open_stack
    url = gateway.url
    chat = str(write_jsonl(data / "chat.jsonl", CHAT))

    # Bad input: the gateway's own 400, its field named on the page, no traceback.
    driver.get(f"{url}/")
    _wait(driver, lambda d: _css(d, "#f-template option[value=efficient_llm]"))
    _fill(driver, {"f-base": str(tiny_model), "f-dataset": "/etc/passwd", "f-overrides": ""})
    _css(driver, "#f-submit")[0].click()
    box = _wait(driver, lambda d: [e for e in _css(d, "#create-error") if e.is_displayed()])[0]
    assert "INVALID_ARGUMENT" in box.text and "outside the allowed roots" in box.text, box.text
    assert _css(driver, "#create-error .violations li code")  # each field, listed
    assert "Traceback" not in driver.page_source
    _fill(driver, {"f-overrides": "{not json"})
    _css(driver, "#f-submit")[0].click()
    _wait(driver, lambda d: "not valid JSON" in _css(d, "#create-error")[0].text)

    # A run from a template, with the tiny model: it shows up in the list ...
    run_id = _create(
        driver,
        url,
        {
            "f-name": "dash-a",
            "f-base": str(tiny_model),
            "f-dataset": chat,
            "f-overrides": _steps(12),
        },
    )
    row = f"#runs-table tr[data-run-id='{run_id}']"
    _wait(
        driver,
        lambda d: (
            "dash-a"
            in (d.execute_script(f'return document.querySelector("{row}")?.textContent') or "")
        ),
    )

    # ... and its page draws the loss curve from the run's event stream.
    _wait(driver, lambda d: _click(d, f"{row} a.run-link"))
    _wait(driver, lambda d: d.current_url.endswith(f"/ui/runs/{run_id}"))
    _wait(driver, lambda d: _loss_points(d)[0] >= 3)
    points, loss = _loss_points(driver)
    assert points >= 3 and float(loss) > 0, (points, loss)
    series = _css(driver, "[data-chart=loss]")[0].get_attribute("data-series").split(",")
    assert "train_loss" in series and set(series) <= {"train_loss", "val_loss"}
    assert _css(driver, "[data-chart=loss] canvas")  # uPlot drew it
    _wait(driver, lambda d: _css(d, "#run-state")[0].text == "succeeded")
    stages = [s.get_attribute("data-stage") for s in _css(driver, "section.stage")]
    assert stages == ["distill", "sft"]
    assert all(_loss_points(driver)[0] >= 1 for _ in stages)
    assert "Result:" in _css(driver, "#run-result")[0].text
    assert not _css(driver, "#cancel")[0].is_displayed()  # nothing to cancel any more

    # A job's own page: its curve and its checkpoints.
    _wait(driver, lambda d: _click(d, "section.stage[data-stage=sft] .links a"))
    _wait(driver, lambda d: _css(d, "#job-state")[0].text == "succeeded")
    _wait(driver, lambda d: _loss_points(d)[0] >= 1)
    _wait(driver, lambda d: len(_css(d, "#checkpoints-table tbody tr:not(.empty)")) >= 1)

    # A second, long run, cancelled from its page.
    long_id = _create(
        driver,
        url,
        {
            "f-name": "dash-b",
            "f-base": str(tiny_model),
            "f-dataset": chat,
            "f-overrides": _steps(100000, report=2, validate=10),
        },
    )
    driver.get(f"{url}/ui/runs/{long_id}")
    _wait(driver, lambda d: _loss_points(d)[0] >= 6 and _css(d, "#run-state")[0].text == "running")
    assert _css(driver, "#run-eta")[0].text not in ("", "–")  # an ETA while it runs
    if shot := os.environ.get("MLXU_DASHBOARD_SCREENSHOT"):  # docs/dashboard.png
        _wait(driver, lambda d: _loss_points(d)[0] >= 30)  # a curve worth looking at
        driver.save_screenshot(str(Path(shot).resolve()))
    cancel = _wait(driver, lambda d: [b for b in _css(d, "#cancel") if b.is_displayed()])[0]
    cancel.click()
    _wait(driver, lambda d: d.switch_to.alert).accept()
    _wait(driver, lambda d: _css(d, "#run-state")[0].text == "cancelled")

    # The lists: both runs, their jobs, the (empty) registry, and no error anywhere.
    driver.get(f"{url}/ui/jobs")
    _wait(driver, lambda d: len(_css(d, "#jobs-table tr[data-job-id]")) >= 3)
    driver.get(f"{url}/ui/pipelines")
    _wait(driver, lambda d: "dash-b" in _css(d, "#pipelines-table")[0].text)
    driver.get(f"{url}/ui/models")
    _wait(driver, lambda d: "No registered models" in _css(d, "#models-table")[0].text)
    assert not _css(driver, "#error")[0].is_displayed()

    # With an API key saved, streams are read with fetch (EventSource sends no headers):
    # the finished run's curves replay the same way. (Without keys configured the gateway
    # and services pass any key on, so this stack serves it.)
    _fill(driver, {"api-key": "any-key"})
    _css(driver, "#key-form button")[0].click()
    driver.get(f"{url}/ui/runs/{run_id}")
    _wait(driver, lambda d: _css(d, "#live")[0].text == "finished")
    assert _loss_points(driver)[0] >= 3
    assert driver.execute_script("return localStorage.getItem('mlxu.apiKey')") == "any-key"
