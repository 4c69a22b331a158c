"""The dashboard's HTML from plain records: whatever a user or a job sets (a name, an owner, a
reason, a log line, a metric's value) comes out as text, never as markup; a curve has a point
per evaluation; a long series is thinned with its last point kept; shards show only when
there are some."""

from __future__ import annotations

from gradhub.proto.contract.states import JobState, WorkerPhase
from gradhub.server import dashboard_html as page
from gradhub.server.checkpoints import CheckpointInfo
from gradhub.server.job_db import JobRecord, MetricPoint
from gradhub.server.jobs import JobView, WorkerView

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def view(**changes: object) -> JobView:
    fields: dict[str, object] = {"id": "j-1", "name": "digits", "mode": "ps-sync", "spec_json": "{}",
                                 "state": JobState.RUNNING, "step": 30, "total_steps": 60,
                                 "metrics": {"loss": 0.5, "val_accuracy": 0.9}, "samples_per_second": 120.0}
    fields.update(changes)
    worker = WorkerView(0, WorkerPhase.RUNNING, 30, 1, 2, EVIL, 42, 1, "unix")
    return JobView(JobRecord(**fields), (worker,))  # type: ignore[arg-type]


def points(evals: int, trains: int) -> list[MetricPoint]:
    out = [MetricPoint(i, 10 * i, "train", {"loss": 1 / (i + 1), "lr": 0.1, "samples_per_s": 100.0}, 0.0)
           for i in range(trains)]
    out += [MetricPoint(trains + i, 20 * (i + 1), "eval", {"val_accuracy": 0.5 + i / 10, "val_loss": 1.0}, 0.0)
            for i in range(evals)]
    return out


def test_what_users_set_is_text_not_markup():
    v = view(name=EVIL, owner=EVIL, reason=EVIL, mode=EVIL)
    ckpt = CheckpointInfo("j-1", 60, 60, 1024, "ab" * 32, 0.0, None)  # type: ignore[arg-type]
    live = page.job_live(v, points(2, 3), [(1, EVIL)], [ckpt], (), may_pull=True, now=0.0)
    html = page.layout(EVIL, page.job_page(v, "token", live), [page.NavLink(EVIL, "/x")])
    html += page.job_rows([v], now=0.0)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert '<script src="/static/dashboard.js" defer></script>' in html  # the dashboard's own, only


def test_the_accuracy_curve_has_a_point_per_evaluation():
    svg = page.chart(page.CURVES[1], points(evals=4, trains=10))
    assert 'data-metric="val_accuracy"' in svg
    polyline = svg.split("<polyline", 1)[1].split("/>", 1)[0]
    assert len(polyline.split('points="', 1)[1].split('"')[0].split()) == 4
    assert svg.count("<circle") == 4
    assert "no points yet" in page.chart(page.CURVES[1], points(evals=0, trains=3))


def test_a_long_series_is_thinned_and_keeps_its_last_point():
    xy = [(i, float(i)) for i in range(1001)]
    thinned = page.thin(xy, 400)
    assert len(thinned) <= 400 and thinned[0] == xy[0] and thinned[-1] == xy[-1]
    assert page.thin(xy[:10], 400) == xy[:10]


def test_shards_show_only_when_there_are_some():
    assert page.shard_table(()) == ""
    shards = [page.ShardView(0, "head", 12.5, 0, 0), page.ShardView(1, "10.0.0.2", 12.5, 2048, 4096)]
    table = page.shard_table(shards)
    assert "Parameter-server shards" in table and "2.0 KiB" in table and "0 (control)" in table


def test_cancel_and_download_only_for_those_who_may():
    v = view()
    ckpt = CheckpointInfo("j-1", 60, 60, 1024, "ab" * 32, 0.0, None)  # type: ignore[arg-type]
    assert "id=cancel" in page.job_page(v, "token", "") and "id=cancel" not in page.job_page(v, None, "")
    assert "id=cancel" not in page.job_page(view(state=JobState.SUCCEEDED), "token", "")
    assert "/jobs/j-1/checkpoints/60" in page.checkpoint_table("j-1", [ckpt], may_pull=True)
    assert "/checkpoints/" not in page.checkpoint_table("j-1", [ckpt], may_pull=False)
