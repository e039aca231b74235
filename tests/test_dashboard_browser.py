"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) opens a real coordinator's page while two tiny-gpt2
workers train. Before the token is given the page asks for it; with it, its JavaScript runs
without a console error, the workers' rows, the loss curve, the per-rank timeline and the peer
round-trip matrix fill in for the live run, and nobody is shown stalled (the negative control).
One worker is stopped with SIGSTOP: within a few seconds its row is highlighted and the status
sentence on top names it and the collective it owes. SIGCONT, and the run finishes. The
browser resolves no host name, so the page needs nothing beyond the coordinator (no CDN). A
screenshot of the stalled run is left in the test's temporary directory."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time

import httpx
import pytest

from worker.cluster.launcher import (
    kill_all,
    local_worker_env,
    spawn,
    start_coordinator,
    supervise,
    token_env,
    worker_argv,
)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the browser test needs Debian's chromium and chromium-driver (`apt-get install "
                "chromium chromium-driver`; `make test` installs them as root): "
                f"chromium {CHROMIUM or 'absent'}, chromedriver {CHROMEDRIVER or 'absent'}",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency "
                                "(pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "dashboard-token"
STALL_AFTER = 3.0
POLL_S = 2.0  # the page's refresh period (EVERY_MS in coordinator/static/dashboard.js)
WORLD = 2
STEPS = 300  # 10-25 steps a second here: the stop lands well before the end
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--micro-batch-rows", "4", "--seq-len",
        "32", "--max-tokens", "60000", "--schedule", "constant", "--lr", "3e-3",
        "--heartbeat-interval", "0.5"]


@contextlib.contextmanager
def chromium(profile):
    """Headless Chromium that keeps its console log and resolves no host name (the page must
    load everything from the coordinator, which the tests reach by IP)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1500", f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                 "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-default-apps", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def errors(log: list[dict]) -> list[str]:
    """The console's errors and warnings (uncaught exceptions, failed loads, console.error)."""
    return [e["message"] for e in log if e["level"] in ("SEVERE", "WARNING")]


def text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def points(driver, chart: str) -> int:
    """How many values the page gave chart ``chart`` (its ``data-points``)."""
    return int(driver.find_element(By.ID, chart).get_attribute("data-points") or 0)


def redraws(driver) -> int:
    return int(driver.find_element(By.ID, "updated").get_attribute("data-count") or 0)


def refreshed(driver) -> None:
    """Wait until the page has redrawn once more."""
    done = redraws(driver)
    WebDriverWait(driver, 3 * POLL_S, 0.1).until(lambda d: redraws(d) > done,
                                                 "the page stopped refreshing")


@pytest.mark.timeout(120)
def test_dashboard_shows_a_live_run_and_the_stalled_rank(tmp_path):
    coordinator, url = start_coordinator(token=TOKEN, echo=False, heartbeat_timeout=60.0,
                                         stall_after=STALL_AFTER)
    workers = []
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    began = time.monotonic()
    try:
        env = {**local_worker_env(WORLD), **token_env(TOKEN)}
        workers = [spawn(f"w{i}", worker_argv(url, worker_id=f"w{i}", min_workers=WORLD,
                                              extra=ARGS + ["--output", str(tmp_path / "out")]),
                         env=env, echo=False)[0] for i in range(WORLD)]
        with chromium(tmp_path / "profile") as driver:
            driver.get(url)
            # No token yet: the page says what it needs, and asks nothing more until given one.
            WebDriverWait(driver, 10, 0.1).until(lambda d: "token" in text(d, "#error"),
                                                 "the page did not ask for the token")
            refused = errors(driver.get_log("browser"))
            assert refused and all("401" in m for m in refused), refused
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "save").click()

            def live(d) -> bool:
                rows = d.find_elements(By.CSS_SELECTOR, "#workers tbody tr[data-rank]")
                return (len(rows) == WORLD and points(d, "loss") >= 3
                        and points(d, "timeline") >= 2 * WORLD
                        and d.find_elements(By.CSS_SELECTOR, "#latency td[data-rtt-ms]"))

            WebDriverWait(driver, 60, 0.2).until(live, "the live run's rows and curves")
            print(f"\npage live after {time.monotonic() - began:.1f} s")
            assert text(driver, "#error") == ""
            assert f"generation 1, {WORLD} members" in text(driver, "#generation")
            rtts = [float(td.get_attribute("data-rtt-ms"))
                    for td in driver.find_elements(By.CSS_SELECTOR, "#latency td[data-rtt-ms]")]
            assert len(rtts) == WORLD * (WORLD - 1) and all(0 < v < 2000 for v in rtts), rtts
            assert points(driver, "throughput") > 0 and points(driver, "generations") > 0
            # Negative control: a healthy run shows nobody stalled, redraw after redraw.
            for _ in range(2):
                refreshed(driver)
                assert driver.find_elements(By.CSS_SELECTOR, "tr.stalled") == []
                assert "stalled" not in driver.find_element(By.ID, "status").get_attribute("class")
                assert text(driver, "#status").startswith("no rank is stalled"), \
                    text(driver, "#status")

            victim = http.get("/training/status").json()["ranks"][1]
            child = next(w for w in workers if w.name == victim["worker_id"])
            assert child.proc.poll() is None, "the run ended before the stop: raise STEPS"
            child.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                who = f"rank 1 ({victim['worker_id']} at {victim['address']}) has sent nothing"

                def shown(d) -> bool:
                    rows = d.find_elements(By.CSS_SELECTOR, "#workers tr.stalled")
                    return rows and text(d, "#status").startswith(who) and rows

                rows = WebDriverWait(driver, 2 * STALL_AFTER + 2 * POLL_S + 4, 0.1).until(
                    shown, "the stalled rank on the page")
                seen_after = time.monotonic() - stopped
                banner = text(driver, "#status")
                shot = tmp_path / "dashboard.png"
                driver.save_screenshot(str(shot))
            finally:
                child.proc.send_signal(signal.SIGCONT)
            print(f"page named the stalled rank {seen_after:.1f} s after SIGSTOP: {banner}")
            print(f"screenshot: {shot}")
            assert [r.get_attribute("data-rank") for r in rows] == ["1"]
            assert rows[0].get_attribute("data-worker") == victim["worker_id"]
            assert "STALLED" in rows[0].text and "rank 0 wait" in rows[0].text, rows[0].text
            assert "stalled" in driver.find_element(By.ID, "status").get_attribute("class")
            assert banner.endswith("rank 0 is waiting on it"), banner
            assert seen_after <= 2 * STALL_AFTER + POLL_S + 1, f"shown after {seen_after:.1f} s"
            assert shot.stat().st_size > 10_000

            supervise(workers, timeout=60)  # SIGCONT: the run goes on and finishes
            print(f"finished {time.monotonic() - stopped:.1f} s after SIGSTOP")
            refreshed(driver)
            assert driver.find_elements(By.CSS_SELECTOR, "tr.stalled") == []
            assert points(driver, "loss") >= 3
            assert errors(driver.get_log("browser")) == [], "console errors after the token"
            assert text(driver, "#error") == ""
        result = json.loads((tmp_path / "out" / "result.json").read_text())
        assert result["generation"] == 1 and len(result["losses"]) == STEPS
    finally:
        http.close()
        kill_all(workers + [coordinator])
