"""The sliding-window limiter, driven by an explicit clock."""

from __future__ import annotations

import threading

from cueline_server.api.descriptors import methods
from cueline_server.api.ratelimit import GRPC_PER_IP, SlidingWindowLimiter


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_limit_refuses_without_counting_and_the_window_slides() -> None:
    clock = Clock(1_000.4)
    limiter = SlidingWindowLimiter(clock=clock)
    first = limiter.hit("k", 3)
    assert (first.allowed, first.limit, first.remaining, first.reset) == (True, 3, 2, 1_060)
    clock.now = 1_030.2
    assert [limiter.hit("k", 3).remaining for _ in range(2)] == [1, 0]
    refused = limiter.hit("k", 3)
    # The oldest request (second 1000) leaves the window at 1060: 29.8 s away, rounded up.
    assert (refused.allowed, refused.remaining, refused.reset, refused.retry_after) == (False, 0, 1_060, 30)
    assert limiter.usage("k") == 3  # the refusal was not counted
    clock.now = 1_059.99
    assert limiter.hit("k", 3).retry_after == 1  # never 0, never a fraction
    clock.now = 1_060.0
    allowed = limiter.hit("k", 3)
    assert (allowed.allowed, allowed.remaining, allowed.reset) == (True, 0, 1_090)
    clock.now = 1_090.0
    assert limiter.usage("k") == 1


def test_keys_are_independent_and_a_lowered_limit_waits_for_enough_room() -> None:
    clock = Clock(50.0)
    limiter = SlidingWindowLimiter(clock=clock)
    for second in (50.0, 51.0, 52.0, 53.0):
        clock.now = second
        assert limiter.hit("a", 10).allowed
    assert limiter.hit("b", 10).remaining == 9
    refused = limiter.hit("a", 2)  # 4 counted, limit now 2: room once 3 have left (at 112)
    assert (refused.reset, refused.retry_after) == (112, 59)
    assert limiter.hit("a", 0).limit == 1  # a limit below 1 counts as 1


def test_idle_keys_are_forgotten_and_the_key_count_is_capped() -> None:
    clock = Clock(0.0)
    limiter = SlidingWindowLimiter(clock=clock, max_keys=3)
    for key in "abcd":
        limiter.hit(key, 5)
    assert limiter.tracked_keys() == 3 and limiter.usage("a") == 0  # the least recently used went first
    clock.now = 61.0
    limiter.hit("e", 5)
    assert limiter.tracked_keys() == 1


def test_concurrent_hits_count_exactly() -> None:
    limiter = SlidingWindowLimiter()
    allowed: list[bool] = []

    def worker() -> None:
        for _ in range(200):
            allowed.append(limiter.hit("shared", 1_000).allowed)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert allowed.count(True) == 1_000 and allowed.count(False) == 600
    assert limiter.usage("shared") == 1_000


def test_every_grpc_method_without_credentials_is_a_probe_or_has_a_budget() -> None:
    """A new public method must be given a per-IP budget, or be exempt as its
    REST route is: gRPC is otherwise not limited."""
    public = {m.full_name for m in methods() if m.public}
    exempt = {
        "/cueline.v1.ProbeService/GetHealth",
        "/cueline.v1.ProbeService/GetStatus",
        # The partner surface, unlimited on REST too; a link's secret is checked by an HMAC.
        "/cueline.partner.v1.PartnerActionService/ReportActionState",
    }
    assert public - exempt == set(GRPC_PER_IP)
