"""The sweep pages' HTML from plain views: what a user sets (the sweep's name, its owner, the
space's values, a trial's reason) comes out as text, never as markup; the leaderboard keeps the
runner's order, marks pruned trials and the best one and links each trial to its job; the
chart has a marker per completed or pruned trial and a best-so-far line over completed ones."""

from __future__ import annotations

import re

from gradhub.proto.contract.sweep import SweepSpec, SweepState, TrialState
from gradhub.server import dashboard_html as page
from gradhub.server import dashboard_sweeps as sweeps
from gradhub.server.sweep_db import SweepRecord, TrialRecord
from gradhub.server.sweep_runner import SweepView, TrialView, leaderboard

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'
JOB = {"name": "digits", "mode": "ps-sync", "workers": 1, "model": {"name": "mlp", "args": {"hidden": [16]}},
       "dataset": "digits", "optimizer": {"name": "adam", "lr": 0.01}, "steps": 60, "eval_every": 20}


def view(trials: list[TrialRecord], mode: str = "max", state: SweepState = SweepState.RUNNING,
         name: str = "lr", owner: str = "alice") -> SweepView:
    spec = SweepSpec.from_dict({
        "job": JOB, "search": "random", "name": name, "trials": 4, "parallel": 2, "prune": "median",
        "space": {"optimizer.lr": {"loguniform": [1e-4, 0.05]}, "model.args.hidden": {"choice": [[16], [EVIL]]}},
        "objective": {"metric": "val_accuracy", "mode": mode}})
    record = SweepRecord(id="s-1", name=name, spec_json=spec.to_json(), seed=7, state=state, owner=owner,
                         reason=EVIL if state.terminal else "", created_at=100.0)
    ordered = leaderboard(trials, mode)
    complete = [t for t in ordered if t.state is TrialState.COMPLETE]
    return SweepView(record, spec, tuple(TrialView(t, "X", t.step, 60) for t in ordered),
                     complete[0].number if complete else None)


def trial(number: int, state: TrialState, value: float | None, **more: object) -> TrialRecord:
    return TrialRecord(sweep_id="s-1", number=number, params={"optimizer.lr": 0.01 * (number + 1),
                                                              "model.args.hidden": [EVIL]},
                       internal={}, state=state, job_id=f"j-{number}", value=value, **more)  # type: ignore[arg-type]


TRIALS = [trial(0, TrialState.COMPLETE, 0.80), trial(1, TrialState.PRUNED, 0.30, reason=EVIL),
          trial(2, TrialState.COMPLETE, 0.90), trial(3, TrialState.RUNNING, None)]


def test_what_users_set_is_text_not_markup():
    v = view(TRIALS, state=SweepState.CANCELLED, name=EVIL, owner=EVIL)
    html = page.layout(EVIL, sweeps.sweep_page(v, "token", now=200.0), [sweeps.SWEEPS])
    html += sweeps.sweep_rows([v], now=200.0)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(\\&quot;x\\&quot;)" in html  # a value of the space, as JSON, as text


def test_the_leaderboard_keeps_the_order_marks_pruned_and_best_and_links_jobs():
    v = view(TRIALS)
    board = sweeps.leaderboard(v)
    assert re.findall(r'data-trial="(\d+)"', board) == ["2", "0", "1", "3"]  # complete by value, pruned, running
    assert 'data-trial="1" data-state="PRUNED" class="pruned"' in board
    assert 'data-trial="2" data-state="COMPLETE" class="complete best"' in board
    assert board.count('<a class=job href="/jobs/j-') == 4
    assert "0.9" in board and "optimizer.lr=0.03" in board
    minimizing = sweeps.leaderboard(view(TRIALS, mode="min"))
    assert re.findall(r'data-trial="(\d+)"', minimizing) == ["0", "2", "1", "3"]


def test_the_chart_has_a_marker_per_ended_trial_and_a_best_so_far_line():
    svg = sweeps.objective_chart(view(TRIALS))
    assert 'data-chart=objective' in svg
    assert re.findall(r'<circle class="trial (\w+)" data-trial="(\d+)"', svg) == [
        ("complete", "0"), ("pruned", "1"), ("complete", "2")]
    line = re.search(r'data-series="best so far" points="([^"]*)"', svg)
    assert line is not None
    ys = [float(p.split(",")[1]) for p in line.group(1).split()]
    assert len(ys) == 3 and ys[0] == ys[1] > ys[2]  # flat at trial 0's value until trial 2 beats it (up is less y)
    assert "no trial ended yet" in sweeps.objective_chart(view([trial(0, TrialState.RUNNING, None)]))


def test_the_cancel_button_only_for_who_may_and_while_it_runs():
    running = sweeps.sweep_page(view(TRIALS), "tok", now=200.0)
    assert 'action="/sweeps/s-1/cancel"' in running and 'name=csrf value="tok"' in running
    assert "id=cancel" not in sweeps.sweep_page(view(TRIALS), None, now=200.0)
    ended = view(TRIALS, state=SweepState.SUCCEEDED)
    assert "id=cancel" not in sweeps.sweep_page(ended, "tok", now=200.0)
    assert "data-live=false" in sweeps.sweep_page(ended, "tok", now=200.0)


def test_the_list_row_shows_the_sweep_at_a_glance():
    row = sweeps.sweep_rows([view(TRIALS)], now=160.0)
    assert 'data-sweep="s-1"' in row and 'href="/sweeps/s-1"' in row
    assert "random" in row and "val_accuracy" in row and "3/4" in row and ">0.9<" in row and ">1m<" in row
    assert "No sweeps" in sweeps.sweep_rows([], now=0.0)
