"""The embedded allowlist caches chain reads for at most the revocation delay."""

from __future__ import annotations

from mock_kms import chain
from mock_kms.allowlist import EmbeddedAllowlist, ReaderSettings

IMAGE = bytes.fromhex("ab" * 32)
APP = b"cached-app".ljust(32, b"\0")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_lookups_hit_the_cache() -> None:
    allowlist = EmbeddedAllowlist.create([(IMAGE, APP)], clock=Clock())
    assert allowlist.lookup(IMAGE).allowed
    assert allowlist.lookup(IMAGE).application == APP
    stats = allowlist.stats()
    assert (stats.hits, stats.misses) == (1, 1)


def test_removal_through_the_allowlist_is_immediate() -> None:
    allowlist = EmbeddedAllowlist.create([(IMAGE, APP)], clock=Clock())
    assert allowlist.lookup(IMAGE).allowed
    allowlist.remove_image(IMAGE)
    assert not allowlist.lookup(IMAGE).allowed


def test_change_made_on_chain_directly_is_seen_within_the_revocation_delay() -> None:
    clock = Clock()
    allowlist = EmbeddedAllowlist.create(
        [(IMAGE, APP)], settings=ReaderSettings(max_staleness=2.0), clock=clock
    )
    assert allowlist.lookup(IMAGE).allowed
    # Governance acting on the chain itself, not through this object: the cache cannot know.
    request = chain.remove_request(allowlist.contract_address, IMAGE)
    chain.send(allowlist.w3, request, sender=allowlist.owner)
    clock.now += 1.99
    assert allowlist.lookup(IMAGE).allowed  # still inside the documented delay
    clock.now += 0.02
    assert not allowlist.lookup(IMAGE).allowed  # past it: the removal is seen


def test_zero_staleness_disables_the_cache() -> None:
    allowlist = EmbeddedAllowlist.create(
        [(IMAGE, APP)], settings=ReaderSettings(max_staleness=0), clock=Clock()
    )
    allowlist.lookup(IMAGE)
    allowlist.lookup(IMAGE)
    assert allowlist.stats().hits == 0
