"""Events: the recorder (one Event per happening, counted when it repeats, never raising), their
expiry after an hour, and how kubectl is shown them (a Table with NAME last)."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import aiohttp

from netplane import events
from netplane.client import Client
from netplane.events import EventRecorder
from tests.unit.test_apiserver import RunningAPIServer

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team", "uid": "u1"},
       "spec": {"containers": [{"name": "c", "image": "netplane/echo"}]}}
NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "u2"}}


def test_an_event_names_its_object_and_lives_in_its_namespace():
    event = events.new_event(POD, "Normal", "Started", "Started container c", "kubelet", "n1", "2026-12-01T00:00:00Z")
    assert event["involvedObject"] == {"kind": "Pod", "name": "p", "namespace": "team", "uid": "u1", "apiVersion": "v1"}
    assert event["metadata"]["namespace"] == "team" and event["metadata"]["name"].startswith("p.")
    assert event["source"] == {"component": "kubelet", "host": "n1"} and event["count"] == 1
    assert events.new_event(NODE, "Normal", "x", "y", "c", "", "t")["metadata"]["namespace"] == "default"


def test_events_expire_an_hour_after_they_were_last_seen():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    stamp = lambda delta: (now - delta).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert events.expired({"lastTimestamp": stamp(timedelta(hours=1, seconds=1))}, now)
    assert not events.expired({"lastTimestamp": stamp(timedelta(minutes=59))}, now)
    assert not events.expired({"lastTimestamp": "not a time"}, now)


def test_the_recorder_counts_repeats_and_the_api_server_expires_old_events(tmp_path):
    async def scenario(api):
        async with Client(api.url) as client:
            await client.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
            recorder = EventRecorder(client, "kubelet", "n1")
            for _ in range(3):
                await recorder.record(POD, "Warning", "BackOff", "Back-off restarting failed container c")
            recorder.emit(POD, "Normal", "Started", "Started container c")
            await recorder.flush()
            listed = (await client.list("Event", "team", field_selector="involvedObject.name=p"))["items"]
            old = events.new_event(POD, "Normal", "Old", "long ago", "kubelet", "n1", "2020-01-01T00:00:00Z")
            await client.create(old)
            expired = await api.server.registry.expire_events(datetime.now(timezone.utc))
            after = (await client.list("Event", "team"))["items"]
            async with aiohttp.ClientSession() as session, session.get(
                    f"{api.url}/api/v1/namespaces/team/events",
                    headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}) as resp:
                table = await resp.json()
            return listed, expired, after, table

    with RunningAPIServer(str(tmp_path / "api.db")) as api:
        listed, expired, after, table = api.call(scenario(api))
    by_reason = {e["reason"]: e for e in listed}
    assert set(by_reason) == {"BackOff", "Started"}
    assert by_reason["BackOff"]["count"] == 3 and by_reason["BackOff"]["type"] == "Warning"
    assert expired == 1 and {e["reason"] for e in after} == {"BackOff", "Started"}
    headers = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert headers == ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert table["columnDefinitions"][-1]["name"] == "NAME"


def test_recording_never_raises_when_the_api_server_is_away():
    async def scenario():
        async with Client("http://127.0.0.1:9") as client:   # nothing listens on the discard port
            await EventRecorder(client, "kubelet").record(POD, "Normal", "Started", "Started container c")
    asyncio.run(scenario())
