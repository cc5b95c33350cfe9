"""Deletion after spec.ttlSecondsAfterFinished (control/reaper.py), through the real
runtime (intake, scheduler, status writer, policy) on an API stand-in that stores the
objects and checks the DELETE's preconditions (ttl_fakes.py).

What is pinned: the time comes from status.completionTime as stored; the DELETE names
the uid and the resourceVersion decided on; 404 is done, 409 is decided again from the
newer object (never dropped), other failures are an Event and a retry with backoff;
a TTL-only edit re-plans without a new watch, a spec edit cancels; deletions keep to
their budget; only the owner deletes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest
from runtime_fakes import one_bucket, until
from ttl_fakes import DONE, RUNNING, Env

from jobwatch.control import reaper
from jobwatch.control.runtime import Runtime
from jobwatch.core.spec import parse_spec, spec_digest
from jobwatch.core.watch import format_time, parse_time
from jobwatch.kube.errors import ApiError, Unreachable

# How late a deletion may come after its due time here: an echo, a scheduler turn, a
# request to a stand-in on the same loop. Measured well under 0.05 s.
SLACK = 0.25


def completed(env: Env, name: str) -> float:
    """The completionTime of the last end stored (the object may be gone since)."""
    at = parse_time(env.api.ends[name].get("completionTime"))
    assert at is not None, env.api.ends[name]
    return at


def assert_planned(runtime: Runtime) -> None:
    """The fleet's invariant, with TTLs: a watch has a next poll or an end phase, and a
    finished watch with a deletion decided has it planned."""
    for key, watch in runtime.watches.items():
        if not watch.finished or watch.deletion is not None:
            assert runtime.scheduler.planned(key), (key, watch.phase, watch.deletion)


async def wait(env: Env, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            assert_planned(env.runtime)
            await asyncio.sleep(0.005)


async def ended(env: Env, name: str) -> float:
    """Waits until the end is stored; its completionTime."""
    await wait(env, lambda: name in env.api.ends)
    return completed(env, name)


async def test_deleted_ttl_after_the_stored_completion_time_with_its_preconditions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "jobwatch.control.runtime")
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        end_version, uid = env.api.version("w"), env.api.objects["w"]["metadata"]["uid"]
        await wait(env, lambda: bool(env.api.deleted("w")))
        [deleted] = env.api.deletes
        # The version decided on is the one holding the end: nothing newer was stored.
        assert (deleted.uid, deleted.resource_version) == (uid, end_version)
        assert at + 1 <= deleted.at < at + 1 + SLACK
        assert ("ns", "w") not in env.runtime.watches
        assert env.deletions("deleted") == 1
        assert not env.api.events or not env.api.warnings(reaper.FAILED_REASON)
    [line] = [r for r in caplog.records if "deleted: spec.ttlSecondsAfterFinished" in r.message]
    assert line.levelno == logging.INFO
    assert f"after completionTime {format_time(at)}" in line.message
    assert "ns/w deleted" in line.message
    assert uid in line.message
    assert " 1 s " in line.message


async def test_ttl_zero_deletes_once_the_end_is_stored_and_no_ttl_never() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("zero", ttlSecondsAfterFinished=0)
        env.api.create("kept")
        zero, kept = await ended(env, "zero"), await ended(env, "kept")
        await wait(env, lambda: bool(env.api.deleted("zero")))
        [deleted] = env.api.deletes
        [(_, end_written)] = [w for w in env.api.status_writes if w[0] == "zero"][-1:]
        # Never before the end is stored (a user could not see how it ended).
        assert zero <= end_written <= deleted.at < zero + SLACK
        # The one without a TTL ended as long ago, and stays, with nothing planned.
        await asyncio.sleep(max(0.0, zero + 2 * SLACK - time.time()))
        assert "kept" in env.api.objects and kept <= zero + SLACK
        assert not env.runtime.scheduler.planned(("ns", "kept"))
        assert [d.name for d in env.api.deletes] == ["zero"]


async def test_a_watch_that_is_gone_already_is_done() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        await ended(env, "w")
        del env.api.objects["w"]  # deleted by someone else; its event not seen yet
        await wait(env, lambda: bool(env.api.deletes))
        assert [d.answer for d in env.api.deletes] == ["gone"]
        await wait(env, lambda: ("ns", "w") not in env.runtime.watches)
        assert env.deletions("gone") == 1 and env.deletions("failed") == 0
        assert not env.api.warnings(reaper.FAILED_REASON)


async def test_a_conflict_is_decided_again_from_the_newer_object() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        await ended(env, "w")
        stale = env.api.version("w")
        env.api.touch("w")  # changed (a label, say); its event has not come yet
        newer = env.api.version("w")
        await wait(env, lambda: bool(env.api.deleted("w")))
        assert [(d.resource_version, d.answer) for d in env.api.deletes] == [
            (stale, "conflict"),
            (newer, "deleted"),
        ]
        assert env.api.reads == 1  # the object was read once after the conflict
        assert env.deletions("conflict") == 1 and env.deletions("deleted") == 1


async def test_an_event_delivered_late_cancels_nothing() -> None:
    async with Env() as env:
        env.http.body = DONE
        created = env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        watch = env.runtime.watches[("ns", "w")]
        # Decided on the end's echo, which comes a loop turn after the end is stored.
        await wait(env, lambda: watch.deletion is not None)
        # The object as first created (same generation, no end): older than the version
        # decided on, as an event held during a bucket's adoption may be.
        env.runtime.observe("MODIFIED", created)
        assert watch.deletion is not None
        await wait(env, lambda: bool(env.api.deleted("w")))
        assert env.api.deleted("w")[0].at < at + 1 + SLACK


async def test_a_namesake_created_meanwhile_is_never_deleted() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        await ended(env, "w")
        # Between the decision and the DELETE, the object is deleted and created again
        # with the same name and another uid (neither event has arrived yet).
        old_uid = env.api.objects["w"]["metadata"]["uid"]
        env.http.body = RUNNING
        env.api.replace("w", ttlSecondsAfterFinished=0)
        new_uid = env.api.objects["w"]["metadata"]["uid"]
        await wait(env, lambda: bool(env.api.deletes))
        await wait(env, lambda: env.runtime.watches.get(("ns", "w")) is not None)
        await wait(env, lambda: env.runtime.watches[("ns", "w")].ref.uid == new_uid)
        assert [(d.uid, d.answer) for d in env.api.deletes] == [(old_uid, "conflict")]
        # The namesake is taken in as the new watch it is, and polled.
        await wait(env, lambda: env.api.status("w").get("phase") == "Polling")
        assert env.api.objects["w"]["metadata"]["uid"] == new_uid
        assert [d.answer for d in env.api.deletes] == ["conflict"]


async def test_a_refused_delete_is_an_event_and_tried_again_with_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reaper, "RETRY_DELAY", 0.1)
    forbidden = (
        'jobwatches.jobwatch.dev "w" is forbidden: User "system:serviceaccount:jobwatch-system:'
        'jobwatch-operator" cannot delete resource "jobwatches"'
    )
    async with Env() as env:
        env.api.delete_faults = [ApiError(403, forbidden), ApiError(403, forbidden)]
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=0)
        at = await ended(env, "w")
        writes = len(env.api.status_writes)
        status = env.api.status("w")
        await wait(env, lambda: bool(env.api.deleted("w")))
        attempts = [d.at for d in env.api.deletes]
        assert len(attempts) == 3
        # 0.1 s, then 0.2 s: doubling.
        assert attempts[1] - attempts[0] >= 0.1 and attempts[2] - attempts[1] >= 0.2
        assert attempts[0] < at + SLACK
        # One Event for the streak (the same error twice), naming the HTTP status.
        await wait(env, lambda: bool(env.api.warnings(reaper.FAILED_REASON)))
        [event] = env.api.warnings(reaper.FAILED_REASON)
        assert "HTTP 403" in event["message"] and "delete on jobwatches" in event["message"]
        assert "Bearer" not in event["message"]
        assert env.deletions("failed") == 2
        # The end status is not rewritten.
        assert len(env.api.status_writes) == writes
        assert status["phase"] == "Succeeded"
    assert any("HTTP 403" in r.message and r.levelno == logging.WARNING for r in caplog.records)


async def test_a_delete_without_answer_is_tried_again_and_a_new_error_is_said_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reaper, "RETRY_DELAY", 0.05)
    async with Env() as env:
        env.api.delete_faults = [ApiError(503, "unavailable"), Unreachable("ReadTimeout")]
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=0)
        await ended(env, "w")
        await wait(env, lambda: bool(env.api.deleted("w")))
        await wait(env, lambda: len(env.api.warnings(reaper.FAILED_REASON)) == 2)
        messages = [e["message"] for e in env.api.warnings(reaper.FAILED_REASON)]
        assert "HTTP 503" in messages[0] and "no answer" in messages[1]


async def test_a_fault_in_the_operator_is_retried_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reaper, "RETRY_DELAY", 0.05)
    async with Env() as env:
        env.api.delete_faults = [RuntimeError("bug")]
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=0)
        await wait(env, lambda: bool(env.api.deleted("w")))
        errors = env.metrics.registry.get_sample_value(
            "jobwatch_internal_errors_total", {"stage": "deleting after the TTL"}
        )
        assert errors == 1


async def test_a_ttl_only_edit_replans_from_the_same_completion_time() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=3600)
        at = await ended(env, "w")
        polls = sum(env.http.sent.values())
        env.api.edit("w", ttlSecondsAfterFinished=1)
        await wait(env, lambda: bool(env.api.deleted("w")))
        [deleted] = env.api.deletes
        assert at + 1 <= deleted.at < at + 1 + SLACK
        # No new watch (no request), and the version decided on is the one where the
        # edit was acknowledged, with the same end.
        assert sum(env.http.sent.values()) == polls
        decided = env.api.history[deleted.resource_version]
        assert decided["observedGeneration"] == 2
        assert parse_time(decided["completionTime"]) == at
        assert decided["attempts"] == 1


async def test_a_ttl_only_edit_keeps_the_watch_and_its_status() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=3600)
        await ended(env, "w")
        before = env.api.status("w")
        env.api.edit("w", ttlSecondsAfterFinished=7200)
        await wait(env, lambda: env.api.status("w").get("observedGeneration") == 2)
        after = env.api.status("w")
        for kept in ("phase", "reason", "startTime", "completionTime", "attempts", "specHash"):
            assert after[kept] == before[kept], kept
        watch = env.runtime.watches[("ns", "w")]
        assert watch.deletion is not None and watch.deletion.expiry.ttl == 7200
        assert sum(env.http.sent.values()) == 1


async def test_removing_the_ttl_cancels_the_deletion() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        env.api.edit("w", ttlSecondsAfterFinished=None)
        await wait(env, lambda: env.api.status("w").get("observedGeneration") == 2)
        watch = env.runtime.watches[("ns", "w")]
        assert watch.deletion is None
        assert not env.runtime.scheduler.planned(("ns", "w"))
        await asyncio.sleep(max(0.0, at + 1 + SLACK - time.time()))
        assert env.api.deletes == []


async def test_a_spec_edit_cancels_and_the_clock_restarts_at_the_new_end() -> None:
    async with Env() as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        first = await ended(env, "w")
        env.http.body = RUNNING
        env.api.edit("w", url="http://jobs.test/w-again")  # a new watch: it runs again
        await wait(env, lambda: env.api.status("w").get("phase") == "Polling")
        await asyncio.sleep(max(0.0, first + 1 + SLACK - time.time()))
        assert env.api.deletes == []  # the first end's deletion was cancelled
        assert env.api.status("w")["observedGeneration"] == 2
        env.http.body = DONE
        await wait(env, lambda: completed(env, "w") > first)
        second = completed(env, "w")
        assert second > first + 1
        await wait(env, lambda: bool(env.api.deleted("w")))
        [deleted] = env.api.deletes
        assert second + 1 <= deleted.at < second + 1 + SLACK


def completed_as_stored(env: Env, name: str) -> float:
    at = parse_time(env.api.history[env.api.deletes[0].resource_version]["completionTime"])
    assert at is not None
    return at


def finished_long_ago(env: Env, name: str, ttl: int, ago: float) -> None:
    """A JobWatch stored as ended `ago` seconds ago, as a restarted operator lists it."""
    env.api.create(name, ttlSecondsAfterFinished=ttl)
    at = time.time() - ago
    body = env.api.objects[name]
    body["status"] = {
        "phase": "Succeeded",
        "reason": "SuccessConditionMet",
        "message": "done",
        "attempts": 3,
        "startTime": format_time(at - 5),
        "deadline": format_time(at + 60),
        "completionTime": format_time(at),
        "observedGeneration": 1,
        "specHash": _digest(body["spec"]),
    }
    env.api.touch(name)


async def test_a_mass_expiry_keeps_to_the_budget_and_status_writes_go_on() -> None:
    """An operator back after a long stop finds a fleet due at once: deleted at the
    deletion budget's pace, while a watch that ends meanwhile has its end written at
    once (its own budget, and a free worker)."""
    env = Env(JOBWATCH_DELETE_QPS="50", JOBWATCH_DELETE_BURST="10")
    env.api.echo = None  # the listing below is what the operator sees first
    names = [f"old{n}" for n in range(200)]
    for name in names:
        finished_long_ago(env, name, ttl=60, ago=3600)
    env.api.echo = env.runtime.observe
    for name in names:
        env.runtime.observe(None, env.api.objects[name])
    async with env:
        await wait(env, lambda: len(env.api.deletes) >= 50)
        env.http.body = DONE
        env.api.create("live")
        at = await ended(env, "live")
        [(_, written)] = [w for w in env.api.status_writes if w[0] == "live"][-1:]
        assert written - at < 0.1  # not behind 150 deletions still waiting their turn
        assert len(env.api.deletes) < len(names)  # they were still waiting
        await wait(env, lambda: len(env.api.deletes) == len(names), timeout=10)
    times = sorted(d.at for d in env.api.deletes)
    # 10 at once, then 50 a second: 190 more take 3.8 s.
    assert times[-1] - times[0] >= 3.6
    assert all(d.answer == "deleted" for d in env.api.deletes)
    assert "live" in env.api.objects


@pytest.mark.parametrize("ago", [10.0, 0.5])
async def test_after_a_restart_the_time_comes_from_status(ago: float) -> None:
    """An object a new process (or a replica taking the bucket over) takes in finished:
    due at completionTime + TTL as stored, at once if that has passed."""
    env = Env()
    env.http.body = DONE
    env.api.echo = None  # stored before this process ran
    finished_long_ago(env, "w", ttl=1, ago=ago)
    env.api.echo = env.runtime.observe
    env.runtime.observe(None, env.api.objects["w"])  # the initial listing
    started = time.time()
    async with env:
        await wait(env, lambda: bool(env.api.deleted("w")))
    [deleted] = env.api.deletes
    expected = max(completed_as_stored(env, "w") + 1, started)
    assert expected <= deleted.at < expected + SLACK
    assert env.http.sent == {}  # resumed as finished: never polled again


async def test_deletions_keep_to_their_budget() -> None:
    async with Env(JOBWATCH_DELETE_QPS="10", JOBWATCH_DELETE_BURST="5") as env:
        env.http.body = DONE
        for n in range(25):
            env.api.create(f"w{n}", ttlSecondsAfterFinished=0)
        await wait(env, lambda: len(env.api.deletes) == 25, timeout=10)
        times = sorted(d.at for d in env.api.deletes)
        # 5 at once, then 10 a second: the last about 2 s after the first.
        assert times[-1] - times[0] >= 1.9
        for i in range(len(times) - 6):
            assert times[i + 6] - times[i] >= 0.05  # never more than the burst at once
        assert all(d.answer == "deleted" for d in env.api.deletes)


async def test_only_the_owner_deletes() -> None:
    ownership = one_bucket(0.6)
    async with Env(ownership=ownership) as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        # Its Lease runs out (not renewed) before the deletion is due.
        await asyncio.sleep(max(0.0, at + 1 + SLACK - time.time()))
        assert env.api.deletes == []


async def test_a_parked_bucket_taken_back_deletes_on_time() -> None:
    ownership = one_bucket(0.5)
    async with Env(ownership=ownership) as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        await until(lambda: not ownership.valid("ns", "w", time.monotonic()), timeout=2)
        ownership.park(0, 0)
        await asyncio.sleep(max(0.0, at + 1 + SLACK - time.time()))
        assert env.api.deletes == []  # not this replica's while parked
        ownership.resume(0, time.monotonic() + 60)
        env.runtime.resume(frozenset({0}))
        await wait(env, lambda: bool(env.api.deleted("w")))


async def test_a_bucket_handed_over_takes_its_deletions_along() -> None:
    ownership = one_bucket(60)
    async with Env(ownership=ownership) as env:
        env.http.body = DONE
        env.api.create("w", ttlSecondsAfterFinished=1)
        at = await ended(env, "w")
        ownership.releasing(0)
        handed = await env.runtime.hand_over(frozenset({0}), budget=0.05)
        assert handed == {}  # a finished watch has no timing to hand on: status has it
        assert ("ns", "w") not in env.runtime.watches
        assert not env.runtime.scheduler.planned(("ns", "w"))
        await asyncio.sleep(max(0.0, at + 1 + SLACK - time.time()))
        assert env.api.deletes == []  # the next holder decides, from completionTime


def _digest(spec: dict[str, object]) -> str:
    return spec_digest(parse_spec(spec))
