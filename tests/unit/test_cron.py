"""Cron schedules (pure) and the CronJob controller's decisions."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from netplane import controllers as c
from netplane import cron, validation
from tests.unit.test_controllers import stored


def at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("spec,when,fires", [
    ("*/15 * * * *", "2026-12-01 10:30", True), ("*/15 * * * *", "2026-12-01 10:31", False),
    ("0 9-17/4 * * MON-FRI", "2026-12-01 13:00", True),     # a Tuesday, 13 = 9 + 4
    ("0 9-17/4 * * MON-FRI", "2026-12-05 13:00", False),    # a Saturday
    ("30 2 1 JAN,JUL *", "2026-07-01 02:30", True),
    ("0 0 13 * FRI", "2026-11-13 00:00", True),             # both day fields restricted: either matches
    ("0 0 13 * FRI", "2026-12-04 00:00", True), ("0 0 13 * FRI", "2026-12-03 00:00", False),
    ("0 0 * * 7", "2026-12-06 00:00", True),                # 7 is Sunday too
    ("@hourly", "2026-12-01 05:00", True), ("@daily", "2026-12-01 05:00", False)])
def test_schedules_fire_when_cron_would(spec, when, fires):
    assert cron.parse(spec).matches(at(when)) is fires


@pytest.mark.parametrize("spec,words", [
    ("* * * *", "expected exactly 5 fields"), ("60 * * * *", "not a valid minute"), ("* * * FOO *", "not a valid month"),
    ("*/0 * * * *", "at least 1"), ("5-2 * * * *", "runs backwards"), ("@every 5m", "unrecognized descriptor")])
def test_bad_schedules_are_named(spec, words):
    with pytest.raises(cron.ScheduleError, match=words):
        cron.parse(spec)


def test_the_latest_missed_time_is_the_one_run():
    schedule = cron.parse("*/10 * * * *")
    assert schedule.latest(at("2026-12-01 10:00"), at("2026-12-01 10:35")) == at("2026-12-01 10:30")
    assert schedule.latest(at("2026-12-01 10:30"), at("2026-12-01 10:35")) is None   # already run


def cronjob(schedule="*/5 * * * *", policy="Allow", status=None, **spec):
    obj = {"apiVersion": "batch/v1", "kind": "CronJob",
           "metadata": {"name": "tick", "namespace": "default", "uid": "cj-uid", "creationTimestamp": "2026-12-01T10:00:00Z"},
           "spec": {"schedule": schedule, "concurrencyPolicy": policy, **spec,
                    "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                                                                   "containers": [{"name": "c", "image": "busybox"}]}}}}}}
    if status:
        obj["status"] = status
    return obj


NOW = at("2026-12-01 10:12").timestamp()


def test_a_cronjob_makes_the_job_of_its_latest_time_once():
    actions = c.reconcile_cronjob(cronjob(), [], NOW)
    [create] = [a for a in actions if a.verb == "create"]
    assert create.name == f"tick-{int(at('2026-12-01 10:10').timestamp() // 60)}"   # named by its time, as in Kubernetes
    assert create.body["metadata"]["annotations"][c.SCHEDULED_ANNOTATION] == "2026-12-01T10:10:00Z"
    assert create.body["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
    status = next(a.body["status"] for a in actions if a.subresource == "status")
    assert status["lastScheduleTime"] == "2026-12-01T10:10:00Z"
    ran = cronjob(status={"lastScheduleTime": "2026-12-01T10:10:00Z"})
    assert [a for a in c.reconcile_cronjob(ran, [], NOW) if a.verb == "create"] == []


def job(name, state=None, created="2026-12-01T10:00:00Z"):
    j = stored(c.job_for(cronjob(), at("2026-12-01 10:00")), f"uid-{name}")
    j["metadata"] = {**j["metadata"], "name": name, "creationTimestamp": created}
    if state:
        j["status"] = {"conditions": [{"type": state, "status": "True"}], "completionTime": "2026-12-01T10:01:00Z"}
    return j


def test_concurrency_policies_and_history_limits():
    running = [job("old")]
    assert [a for a in c.reconcile_cronjob(cronjob(policy="Forbid"), running, NOW) if a.verb == "create"] == []
    replace = [(a.verb, a.kind, a.name) for a in c.reconcile_cronjob(cronjob(policy="Replace"), running, NOW)
               if a.kind == "Job"]
    assert replace[0] == ("delete", "Job", "old") and replace[1][0] == "create"
    assert [a.verb for a in c.reconcile_cronjob(cronjob(policy="Allow"), running, NOW) if a.kind == "Job"] == ["create"]
    history = [job(f"ok{i}", "Complete", f"2026-12-01T10:0{i}:00Z") for i in range(5)] + [job("bad", "Failed")]
    ran = cronjob(status={"lastScheduleTime": "2026-12-01T10:10:00Z"})
    deleted = sorted(a.name for a in c.reconcile_cronjob(ran, history, NOW) if a.verb == "delete")
    assert deleted == ["ok0", "ok1"]                          # the 3 newest successes kept, the 1 failure kept
    assert [a for a in c.reconcile_cronjob(cronjob(suspend=True), [], NOW) if a.verb == "create"] == []
    late = cronjob(startingDeadlineSeconds=60)                # 10:10 was 2 minutes ago: missed
    assert [a for a in c.reconcile_cronjob(late, [], NOW) if a.verb == "create"] == []


def test_the_api_refuses_a_cronjob_it_could_never_run():
    obj = validation.default(cronjob(schedule="61 * * * *", timeZone="Mars/Olympus"))
    fields = [f for f, _ in validation.validate(obj)]
    assert fields == ["spec.schedule", "spec.timeZone"]
    always = validation.default(cronjob())
    always["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    assert [f for f, _ in validation.validate(always)] == ["spec.jobTemplate.spec.template.spec.restartPolicy"]
    assert validation.validate(validation.default(cronjob(timeZone="Europe/Paris"))) == []
