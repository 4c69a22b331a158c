"""The dashboard's sweep pages in a real browser (headless Chromium, as ``test_dashboard``): a
tiny real random sweep on digits shows in the sweep list and on its page, whose leaderboard
lists the trials in the runner's order, whose chart has a marker per ended trial, and whose
trial links lead to the trials' job pages; on a server with users, a viewer gets no cancel
button and is refused, a form without the page's token cancels nothing, and the owner cancels
the sweep with a click.

Screenshots are kept in ``$GRADHUB_ARTIFACTS`` (default: the test's tmp_path; the path is printed).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from gradhub.client.client import Client
from gradhub.proto.contract.sweep import SweepSpec, SweepState, TrialState
from gradhub.server.app import Server
from gradhub.server.config import ServerConfig
from gradhub.server.launcher import ExternalLauncher

from . import test_dashboard as dashboard
from .test_dashboard import TOKENS, base, screenshot, sign_in, text_of, wait

# test_dashboard's fixtures: a headless Chromium, a server with HTTP and real Ray, the artifacts folder
browser, server, artifacts = dashboard.browser, dashboard.server, dashboard.artifacts
pytestmark = dashboard.pytestmark  # skipped without chromium and chromium-driver

TRIALS = 3
JOB = {"name": "digits", "mode": "ps-sync", "workers": 1, "resources": {"cpus": 0.5},
       "model": {"name": "mlp", "args": {"hidden": [16]}}, "dataset": "digits", "batch_size": 32,
       "steps": 30, "eval_every": 10, "seed": 1, "optimizer": {"name": "adam", "lr": 0.01}}
SWEEP = {"job": JOB, "search": "random", "seed": 5, "name": "tiny",
         "space": {"optimizer.lr": {"loguniform": [1e-4, 0.03]}},
         "objective": {"metric": "val_accuracy", "mode": "max"}, "trials": TRIALS, "parallel": TRIALS}


def rows(driver: webdriver.Chrome) -> list[tuple[int, str]]:
    """The leaderboard's (trial number, state), top to bottom."""
    return [(int(str(r.get_attribute("data-trial"))), str(r.get_attribute("data-state")))
            for r in driver.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")]


@pytest.mark.timeout(120)
def test_a_sweep_in_the_list_on_its_page_and_its_trials_jobs(server, browser, artifacts):
    with Client(server.address) as client:
        info = client.sweep(SWEEP).wait(timeout=90)
    ended = [t for t in info.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]

    browser.get(base(server) + "/sweeps")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-sweep="{info.id}"]')
    assert all(s in row.text for s in ("tiny", "SUCCEEDED", "random", "val_accuracy", f"{TRIALS}/{TRIALS}"))
    assert browser.find_element(By.CSS_SELECTOR, "nav a[aria-current]").text == "Sweeps"
    screenshot(browser, artifacts, "dashboard-sweeps.png")

    browser.find_element(By.LINK_TEXT, info.id).click()
    wait(browser, 10).until(lambda d: d.find_elements(By.ID, "sweep-id"))
    assert text_of(browser, "sweep-id") == info.id and text_of(browser, "state") == "SUCCEEDED"
    assert "optimizer.lr" in text_of(browser, "space") and "random" in text_of(browser, "spec")
    assert rows(browser) == [(t.number, str(t.state)) for t in info.trials], "the runner's leaderboard order"
    pruned = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tr.pruned")
    assert len(pruned) == sum(t.state is TrialState.PRUNED for t in info.trials)
    assert browser.find_element(By.CSS_SELECTOR, "#leaderboard tr.best").get_attribute("data-trial") == str(
        info.best_trial.number if info.best_trial else None)
    markers = browser.find_elements(By.CSS_SELECTOR, "svg[data-chart=objective] circle.trial")
    assert len(markers) == len(ended) >= 1
    assert not browser.find_elements(By.ID, "cancel"), "an ended sweep has nothing to cancel"
    screenshot(browser, artifacts, "dashboard-sweep.png")

    with urllib.request.urlopen(f"{base(server)}/api/sweeps/{info.id}", timeout=10) as response:
        data = json.load(response)
    assert [t["number"] for t in data["trials"]] == [t.number for t in info.trials]
    assert data["trials_done"] == TRIALS and data["best"]["number"] == info.best_trial.number

    best = info.trials[0]
    browser.find_element(By.CSS_SELECTOR, f'#leaderboard tr[data-trial="{best.number}"] a.job').click()
    wait(browser, 10).until(lambda d: d.find_elements(By.ID, "job-id"))
    assert text_of(browser, "job-id") == best.job_id and text_of(browser, "state") == "SUCCEEDED"


@pytest.mark.timeout(60)
def test_who_may_cancel_a_sweep_and_a_click_that_does(browser, tmp_path):
    (tmp_path / "tokens.yaml").write_text(f"""
users:
  - {{name: alice, token: "{TOKENS['alice']}", role: user}}
  - {{name: vera, token: "{TOKENS['vera']}", role: viewer}}
""")
    config = ServerConfig(port=0, http_port=0, data_dir=tmp_path / "data", tokens_file=tmp_path / "tokens.yaml")
    with Server(config, launcher=ExternalLauncher()) as server:  # no workers: the trials wait in the queue
        sweep_id = server.sweeps.submit(SweepSpec.from_dict({**SWEEP, "parallel": 2}), owner="alice").record.id
        page = f"{base(server)}/sweeps/{sweep_id}"

        def cancel_as(who: str) -> int:
            request = urllib.request.Request(page + "/cancel", data=b"", headers={
                "Authorization": f"Bearer {TOKENS[who]}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as e:
                return e.code

        try:
            browser.get(page)
            sign_in(browser, TOKENS["vera"])
            wait(browser, 10).until(lambda d: d.find_elements(By.ID, "sweep-id"))
            assert text_of(browser, "state") == "RUNNING" and len(rows(browser)) == 2
            assert not browser.find_elements(By.ID, "cancel"), "a viewer may not cancel"
            assert cancel_as("vera") == 403
            browser.delete_all_cookies()

            browser.get(page)
            sign_in(browser, TOKENS["alice"])
            wait(browser, 10).until(lambda d: d.find_elements(By.ID, "cancel"))
            forged = browser.execute_async_script(
                "fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf: 'forged'})})"
                ".then((r) => arguments[1](r.status))", page + "/cancel")
            assert forged == 403
            assert server.sweeps.get(sweep_id).record.state is SweepState.RUNNING

            browser.find_element(By.ID, "cancel").click()
            wait(browser, 15).until(lambda d: text_of(d, "state") == "CANCELLED")
            view = server.sweeps.get(sweep_id)
            assert view.record.state is SweepState.CANCELLED and "alice on the dashboard" in view.record.reason
            assert all(t.record.state is TrialState.FAILED for t in view.trials)
            assert not browser.find_elements(By.ID, "cancel")
        finally:
            browser.delete_all_cookies()
