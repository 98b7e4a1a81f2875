"""The shared reconnect policy: a 1, 2, 4 ... 30 s ladder over failed *sessions*."""

from twisted.internet.task import Clock

from hermes_twisted.net.reconnect import SessionBackoff, exponential_delay


def no_jitter():
    return 0.5  # the middle of the jitter range: no change


def test_ladder_without_jitter():
    assert [exponential_delay(n, rand=no_jitter) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert exponential_delay(0) == 0.0


def test_jitter_stays_inside_the_cap():
    for r in (0.0, 1.0):
        assert 0.8 - 1e-9 <= exponential_delay(1, rand=lambda r=r: r) <= 1.2 + 1e-9
        assert exponential_delay(10, rand=lambda r=r: r) <= 30


def test_connections_dying_right_after_opening_keep_climbing():
    clock = Clock()
    backoff = SessionBackoff(clock, rand=no_jitter)
    delays = []
    for _ in range(5):
        backoff.connection_opened()
        clock.advance(0.5)
        backoff.connection_lost()
        # ClientService asks with attempt=1 after every established-then-lost connection.
        delays.append(backoff(1))
    assert delays == [1, 2, 4, 8, 16]


def test_refused_connects_and_flaps_share_one_ladder():
    clock = Clock()
    backoff = SessionBackoff(clock, rand=no_jitter)
    assert [backoff(n) for n in (1, 2)] == [1, 2]  # two refused connects
    backoff.connection_opened()
    backoff.connection_lost()  # then a session that died at once
    assert backoff(1) == 4


def test_a_stable_connection_resets_the_ladder():
    clock = Clock()
    backoff = SessionBackoff(clock, rand=no_jitter, stable_after=60)
    for _ in range(3):
        backoff.connection_opened()
        backoff.connection_lost()
        backoff(1)
    assert backoff(1) == 8
    backoff.connection_opened()
    clock.advance(61)
    backoff.connection_lost()
    assert backoff(1) == 1
