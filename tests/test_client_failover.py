"""Client failover between KMS replicas (keyutil.client.release_keys with several transports):
in order, the next when one is unreachable or unavailable, one deadline, a denial final."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from test_client import FakeKms, FakeTime, InProcess, request_for

from keyutil.client import KmsDenied, KmsUnavailable, release_keys
from keyutil.simulator import SimulatedNSM
from keyutil.transport import TransportError


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path_factory.mktemp("failover") / "sim")


def events(log: list[tuple[str, str, Mapping[str, Any]]], name: str) -> list[Mapping[str, Any]]:
    return [fields for _, event, fields in log if event == name]


def test_an_unreachable_replica_passes_to_the_next_without_a_pause(nsm: SimulatedNSM) -> None:
    kms = FakeKms(nsm.directory)
    down, up = InProcess(kms), InProcess(kms)
    down.fail = TransportError("unreachable", "connection refused")
    t = FakeTime()
    log: list[tuple[str, str, Mapping[str, Any]]] = []
    release = release_keys(
        [down, up], nsm, request_for(kms), deadline_s=10, clock=t.clock, sleep=t.sleep,
        log=lambda level, event, fields: log.append((level, event, fields)),
    )
    assert release.attempts == 1 and t.slept == []
    assert [f["code"] for f in events(log, "replica_unavailable")] == ["unreachable"]
    release.wipe()


def test_a_503_from_the_first_replica_passes_to_the_second(nsm: SimulatedNSM) -> None:
    first, second = FakeKms(nsm.directory), FakeKms(nsm.directory)
    second.identity = first.identity
    second.root_secret = first.root_secret
    first.script["/v1/release"] = [(503, {"error": "replay_store_unavailable", "message": "x"})]
    release = release_keys(
        [InProcess(first), InProcess(second)], nsm, request_for(first), deadline_s=10
    )
    assert first.calls["/v1/release"] == 1 and second.calls["/v1/release"] == 1
    release.wipe()


def test_a_denial_from_the_first_replica_is_final(nsm: SimulatedNSM) -> None:
    first, second = FakeKms(nsm.directory), FakeKms(nsm.directory)
    first.script["/v1/release"] = [(403, {"error": "image_not_allowed", "message": "no"})]
    with pytest.raises(KmsDenied) as info:
        release_keys([InProcess(first), InProcess(second)], nsm, request_for(first), deadline_s=10)
    assert info.value.code == "image_not_allowed"
    assert sum(second.calls.values()) == 0


def test_every_replica_down_is_retried_in_rounds_until_the_one_deadline(
    nsm: SimulatedNSM,
) -> None:
    kms = FakeKms(nsm.directory)
    replicas = [InProcess(kms), InProcess(kms)]
    replicas[0].fail = TransportError("unreachable", "connection refused")
    replicas[1].fail = TransportError("timeout", "no answer")
    t = FakeTime()
    with pytest.raises(KmsUnavailable) as info:
        release_keys(replicas, nsm, request_for(kms), deadline_s=20, clock=t.clock, sleep=t.sleep)
    assert info.value.code in ("unreachable", "timeout")  # the last one asked
    assert t.now - 1000.0 <= 20.0 and len(t.slept) >= 3
    # Each round asked the first replica, then the second.
    assert len(replicas[0].timeouts) in (len(replicas[1].timeouts), len(replicas[1].timeouts) + 1)


def test_no_replica_is_a_programming_error(nsm: SimulatedNSM) -> None:
    kms = FakeKms(nsm.directory)
    with pytest.raises(ValueError, match="at least one"):
        release_keys([], nsm, request_for(kms), deadline_s=1)
