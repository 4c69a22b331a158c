"""The web dashboard in a real browser: headless Chromium (the system's ``chromium`` and
``chromium-driver``, driven by Selenium) against a real server with real Ray workers. The job
list and a finished job's page show its id and state, its accuracy curve has a point per
evaluation, its checkpoint downloads and a log line with markup in it stays text; a running
job's page lists its workers, follows them as they train and cancels the job with a click,
while a form from another origin or without the page's token is refused; on a server with
users, the browser must sign in, a viewer gets no cancel button and only owners and admins
download checkpoints.

Screenshots are kept in ``$GRADHUB_ARTIFACTS`` (default: the test's tmp_path; the path is printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gradhub.client.client import Client
from gradhub.proto.contract.spec import JobSpec
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from ..conftest import wait_for

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")

EVALS = 3
SPEC = {"name": "dash", "mode": "ps-sync", "workers": 2, "resources": {"cpus": 0.5},
        "model": {"name": "mlp", "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 16,
        "steps": 20 * EVALS, "eval_every": 20, "optimizer": {"name": "sgd", "lr": 0.05}}
MARKUP = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
TOKENS = {"alice": "alice-token-" + "a" * 20, "vera": "vera-token-" + "v" * 20}


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(BROWSER)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1500", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(ServerConfig(port=0, http_port=0, data_dir=tmp_path_factory.mktemp("dashboard"))) as s:
        yield s


@pytest.fixture(scope="module")
def jobs(server: Server) -> Iterator[dict[str, str]]:
    """Both jobs at once (they fit side by side): one that finishes, one that runs until cancelled."""
    with Client(server.address) as client:
        done = client.submit(SPEC)
        running = client.submit({**SPEC, "name": "long", "steps": 1_000_000, "eval_every": 0, "ps_shards": 2})
        yield {"done": done.id, "running": running.id}
        client.cancel(running.id)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("GRADHUB_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def screenshot(driver: webdriver.Chrome, folder: Path, name: str) -> None:
    path = folder / name
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    """The element's text as shown, read in one script: the page's live refresh replaces nodes,
    and one replaced between a lookup and a read is an error (Chrome: "Node with given id does
    not belong to the document", not a stale reference)."""
    text = driver.execute_script("const e = document.getElementById(arguments[0]);"
                                 "return e === null ? null : e.innerText;", element_id)
    if text is None:
        raise NoSuchElementException(f"no element with id {element_id!r}")
    return str(text).strip()


def cell_texts(driver: webdriver.Chrome, rows: str) -> list[list[str]]:
    """Each row's cells' text (``rows``: a CSS selector of table rows), read in one script."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), "
        "r => Array.from(r.querySelectorAll('td'), c => c.innerText.trim()));", rows))


def wait(driver: webdriver.Chrome, seconds: float = 30) -> WebDriverWait:
    return WebDriverWait(driver, seconds, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])


@pytest.mark.timeout(120)
def test_a_finished_job_in_the_list_and_on_its_page(server, jobs, browser, artifacts):
    job_id = jobs["done"]
    with Client(server.address) as client:
        wait_for(lambda: client.get_job(job_id).done, 90, "the short job to end")
        info = client.get_job(job_id)
        assert info.state == "SUCCEEDED", info.reason
        evals = [p for p in client.metrics(job_id) if p.kind == "eval"]
    assert len(evals) == EVALS
    server.manager.log_line(job_id, MARKUP)

    browser.get(base(server) + "/")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
    assert "SUCCEEDED" in row.text and "dash" in row.text and "ps-sync" in row.text
    screenshot(browser, artifacts, "dashboard-jobs.png")
    browser.get(base(server) + "/?state=SUCCEEDED")
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{jobs["running"]}"]')

    browser.find_element(By.LINK_TEXT, job_id).click()
    wait(browser).until(lambda d: d.find_elements(By.ID, "job-id"))
    assert text_of(browser, "job-id") == job_id
    assert text_of(browser, "state") == "SUCCEEDED"
    accuracy = browser.find_element(By.CSS_SELECTOR, 'svg[data-metric="val_accuracy"] polyline')
    assert browser.execute_script("return arguments[0].points.numberOfItems", accuracy) == EVALS
    loss = browser.find_element(By.CSS_SELECTOR, 'svg[data-metric="loss"] polyline[data-series="train"]')
    assert browser.execute_script("return arguments[0].points.numberOfItems", loss) >= 1
    assert not browser.find_elements(By.ID, "cancel"), "a finished job has nothing to cancel"

    # the log line's markup is text: shown as written, and nothing of it ran
    assert MARKUP in text_of(browser, "log")
    assert browser.execute_script("return window.pwned === undefined "
                                  "&& document.querySelectorAll('#log script, #log img').length === 0")

    link = browser.find_element(By.CSS_SELECTOR, "#checkpoints a[download]").get_attribute("href")
    with urllib.request.urlopen(link, timeout=10) as response:
        body = response.read()
    ckpt = server.manager.checkpoint_store.latest(job_id)
    assert ckpt is not None and body == ckpt.path.read_bytes()
    screenshot(browser, artifacts, "dashboard-job.png")


@pytest.mark.timeout(120)
def test_cancel_a_running_job_with_a_click(server, jobs, browser, artifacts):
    job_id = jobs["running"]
    with Client(server.address) as client:
        wait_for(lambda: (j := client.get_job(job_id)).step > 0 and all(w.host for w in j.workers)
                 and len(j.workers) == 2, 60, "the long job to train")

    browser.get(f"{base(server)}/jobs/{job_id}")
    assert text_of(browser, "job-id") == job_id and text_of(browser, "state") == "RUNNING"
    rows = cell_texts(browser, "#workers tbody tr")
    assert len(rows) == 2 and all(r[1] not in ("", "—") for r in rows)
    # its parameter server: the server's control store and two shards, each with its host
    wait(browser).until(lambda d: len(cell_texts(d, "#shards tbody tr")) == 3)
    cells = cell_texts(browser, "#shards tbody tr")
    assert [c[0] for c in cells] == ["0 (control)", "1", "2"] and all(c[1] for c in cells)
    with urllib.request.urlopen(f"{base(server)}/api/jobs/{job_id}", timeout=10) as response:
        assert [s["index"] for s in json.load(response)["shards"]] == [0, 1, 2]

    # the page follows the job by itself: the workers' steps move on, with no reload
    def step(d: webdriver.Chrome) -> str:
        return cell_texts(d, "#workers tbody tr")[0][4]

    first = step(browser)
    browser.execute_script("window.sameDocument = true")
    wait(browser, 15).until(lambda d: step(d) != first)
    assert browser.execute_script("return window.sameDocument === true")

    # a form without the page's token, or from another site, cancels nothing
    token = browser.find_element(By.NAME, "csrf").get_attribute("value")
    cancel_url = f"{base(server)}/jobs/{job_id}/cancel"
    for form, headers in (({}, {}), ({"csrf": token}, {"Origin": "http://evil.example"}),
                          ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"})):
        request = urllib.request.Request(cancel_url, data=urllib.parse.urlencode(form).encode(), headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
    assert server.manager.get(job_id).record.state == "RUNNING"

    screenshot(browser, artifacts, "dashboard-running.png")
    browser.find_element(By.ID, "cancel").click()
    wait(browser).until(lambda d: text_of(d, "state") == "CANCELLED")  # the page follows the job
    assert server.manager.get(job_id).record.state == "CANCELLED"
    wait(browser, 10).until(lambda d: not d.find_elements(By.ID, "cancel"))
    assert "on the dashboard" in server.manager.get(job_id).record.reason


def sign_in(driver: webdriver.Chrome, token: str) -> None:
    field = driver.find_element(By.NAME, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


@pytest.mark.timeout(60)
def test_sign_in_and_what_each_user_may_do(browser, tmp_path):
    (tmp_path / "tokens.yaml").write_text(f"""
users:
  - {{name: alice, token: "{TOKENS['alice']}", role: user}}
  - {{name: vera, token: "{TOKENS['vera']}", role: viewer}}
""")
    config = ServerConfig(port=0, http_port=0, data_dir=tmp_path / "data", tokens_file=tmp_path / "tokens.yaml")
    with Server(config, launcher=ExternalLauncher()) as server:  # no workers: the job just waits for them
        view = server.manager.submit(JobSpec.coerce(SPEC), owner="alice")
        job_id = view.record.id
        server.manager.checkpoint_store.save(job_id, 5, 5, {"w": torch.ones(3)})
        home = base(server)
        try:
            browser.get(f"{home}/jobs/{job_id}")
            wait(browser, 10).until(lambda d: urllib.parse.urlsplit(d.current_url).path == "/login")
            assert urllib.parse.parse_qs(urllib.parse.urlsplit(browser.current_url).query)["next"] == [f"/jobs/{job_id}"]
            sign_in(browser, "not-a-token-of-this-server")
            wait(browser, 10).until(lambda d: "not one this server knows" in d.page_source)
            sign_in(browser, TOKENS["vera"])
            wait(browser, 10).until(lambda d: d.find_elements(By.ID, "job-id"))
            assert text_of(browser, "job-id") == job_id and "alice" in text_of(browser, "live")
            assert not browser.find_elements(By.ID, "cancel"), "a viewer may not cancel"
            assert not browser.find_elements(By.CSS_SELECTOR, "#checkpoints a[download]")
        finally:
            browser.delete_all_cookies()

        def call(path: str, who: str, form: dict[str, str] | None = None) -> int:
            request = urllib.request.Request(home + path, headers={"Authorization": f"Bearer {TOKENS[who]}"},
                                             data=None if form is None else urllib.parse.urlencode(form).encode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                    return int(response.status)
            except urllib.error.HTTPError as e:
                return e.code

        assert call(f"/jobs/{job_id}/checkpoints/5", "vera") == 403
        assert call(f"/jobs/{job_id}/checkpoints/5", "alice") == 200
        assert call(f"/jobs/{job_id}/cancel", "vera", {}) == 403
        assert call(f"/jobs/{job_id}/cancel", "alice", {}) == 200  # redirected to the job's page
        wait_for(lambda: server.manager.get(job_id).record.state == "CANCELLED", 15, "the cancel to take")
        page = urllib.request.urlopen(urllib.request.Request(
            f"{home}/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKENS['alice']}"}), timeout=10).read()
        assert re.search(rb'id=state data-state="CANCELLED"', page)
