"""A cabundle of attacker CAs cross-signing each other costs the KMS no path search
(issue 14.4): each cabundle certificate must be signed by the one before it, checked in
order before the path builder runs, and the bundle's length is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.benchlib import crossed_ca_document
from keyutil.simulator import SimulatedNSM
from mock_kms.config import LIMITS
from mock_kms.errors import AttestationError, ErrorCode
from mock_kms.verifier import AttestationVerifier

T0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
AT = T0 + datetime.timedelta(seconds=5)


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path_factory.mktemp("cab") / "sim", clock=lambda: T0)


def verifier(nsm: SimulatedNSM) -> AttestationVerifier:
    return AttestationVerifier(trusted_roots=[nsm.ca.root], cache_size=0)


def refusal(nsm: SimulatedNSM, document: bytes) -> AttestationError:
    with pytest.raises(AttestationError) as err:
        verifier(nsm).verify(document, at=AT)
    return err.value


def test_crossed_attacker_cas_fail_at_their_first_link(nsm: SimulatedNSM) -> None:
    attackers = LIMITS.max_cabundle_length - 1
    error = refusal(nsm, crossed_ca_document(nsm.ca.root, attackers, T0))
    assert error.code == ErrorCode.CHAIN_INVALID
    assert error.message == (
        "cabundle[1] (Attacker CA): expected a certificate issued and signed by cabundle[0] "
        "(aws.nitro-enclaves.keyutil-simulator); it is not"
    )


def test_the_reviews_bundle_of_root_and_seven_cas_is_too_long(nsm: SimulatedNSM) -> None:
    error = refusal(nsm, crossed_ca_document(nsm.ca.root, 7, T0))
    assert error.code == ErrorCode.CABUNDLE_LENGTH


def test_a_cabundle_out_of_order_is_refused_by_the_link_check(
    nsm: SimulatedNSM, tmp_path: Path
) -> None:
    from test_attacks import Forge

    forge = Forge(tmp_path / "forge")
    root, regional, zonal, instance = forge.cabundle()
    document = forge.document(cabundle=[root, zonal, regional, instance])
    with pytest.raises(AttestationError) as err:
        AttestationVerifier(trusted_roots=[forge.root]).verify(document, at=AT)
    assert err.value.code == ErrorCode.CHAIN_INVALID
    assert err.value.message.startswith("cabundle[1] (")


def cpu_cost(verify: Callable[[], object], runs: int = 7) -> float:
    """The least CPU time of one call over ``runs`` (a shared machine only adds to it)."""
    costs = []
    for _ in range(runs):
        started = time.process_time()
        with contextlib.suppress(AttestationError):
            verify()
        costs.append(time.process_time() - started)
    return min(costs)


def test_a_crafted_bundle_costs_at_most_twice_a_normal_verification(nsm: SimulatedNSM) -> None:
    crafted = crossed_ca_document(nsm.ca.root, LIMITS.max_cabundle_length - 1, T0)
    normal = nsm.document(T0)
    check = verifier(nsm)
    normal_cost = cpu_cost(lambda: check.verify(normal, at=AT))
    crafted_cost = cpu_cost(lambda: check.verify(crafted, at=AT))
    # Before the link check: about 20 times a normal (uncached) verification.
    assert crafted_cost <= 2 * normal_cost, (crafted_cost, normal_cost)
