import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.service import ChildStopFailed, GatewayService
from tests.conftest import take_logged_failures


class Child(Service):
    def __init__(self, name, log, stop=None, start_error=False):
        self.setName(name)
        self._log, self._stop, self._start_error = log, stop, start_error

    def startService(self):
        if self._start_error:
            raise RuntimeError("cannot start " + self.name)
        Service.startService(self)
        self._log.append(("start", self.name))

    def stopService(self):
        Service.stopService(self)
        self._log.append(("stop", self.name))
        return self._stop() if self._stop else succeed(None)


class GatewayServiceTests(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _logged(self, fail_on_logged_errors):
        self.logged = fail_on_logged_errors

    def setUp(self):
        self.clock = Clock()
        self.log = []
        self.top = GatewayService(clock=self.clock, child_stop_timeout=4.0)

    def add(self, *children):
        for c in children:
            c.setServiceParent(self.top)

    def test_stops_in_reverse_order(self):
        self.add(Child("store", self.log), Child("gateway", self.log))
        self.top.startService()
        self.successResultOf(self.top.stopService())
        self.assertEqual(self.log, [("start", "store"), ("start", "gateway"),
                                    ("stop", "gateway"), ("stop", "store")])

    def test_failing_child_is_reported_and_others_still_stop(self):
        def boom():
            raise RuntimeError("disk on fire")
        self.add(Child("store", self.log), Child("platform.irc", self.log, stop=boom))
        self.top.startService()
        f = self.failureResultOf(self.top.stopService(), ChildStopFailed)
        self.assertEqual(f.value.args, ("platform.irc",))
        self.assertIn(("stop", "store"), self.log)
        self.assertEqual(len(take_logged_failures(self.logged, RuntimeError)), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_hung_child_is_abandoned_after_timeout(self):
        self.add(Child("store", self.log), Child("relay", self.log, stop=Deferred))
        self.top.startService()
        d = self.top.stopService()
        self.assertNoResult(d)
        self.clock.advance(4.0)
        self.assertEqual(self.failureResultOf(d, ChildStopFailed).value.args, ("relay",))
        self.assertIn(("stop", "store"), self.log)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_child_failing_to_start_does_not_stop_the_others(self):
        self.add(Child("bad", self.log, start_error=True), Child("good", self.log))
        self.top.startService()
        self.assertIn(("start", "good"), self.log)
        self.assertEqual(len(take_logged_failures(self.logged, RuntimeError)), 1)
        self.flushLoggedErrors(RuntimeError)
        self.successResultOf(self.top.stopService())




#: Run in a child interpreter: the tuning freezes the heap and sets process-wide thresholds.
_LONG_TURN_GARBAGE = """
import gc, weakref
from hermes_twisted.service import tune_garbage_collector

class Node:
    pass

tune_garbage_collector()
# A long turn: its objects survive the young collections that run while it streams, so
# they are promoted to the oldest generation...
turn = []
for _ in range(2000):
    node = Node()
    node.cycle = node
    turn.append(node)
gc.collect(1)
ended = weakref.ref(turn[0])
del turn, node
# ...and when it ends they are cyclic garbage there.  Short turns go on making young garbage.
made = 0
while ended() is not None and made < LIMIT:
    node = Node()
    node.cycle = node
    del node
    made += 1
print(made if ended() is None else "never")
"""


def test_garbage_of_long_turns_is_collected_while_short_turns_go_on():
    """The soak at a saturating rate: turns that lasted seconds left their reference cycles
    in the oldest generation, where the tuned thresholds (7000, 20, 100) let them pile up
    for 14 M allocations; two thirds of the live heap was such garbage after 2 minutes."""
    import subprocess
    import sys

    limit = 2_000_000
    out = subprocess.run([sys.executable, "-c", _LONG_TURN_GARBAGE.replace("LIMIT", str(limit))],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out != "never", f"cyclic garbage in the oldest generation outlived {limit} allocations"
    assert int(out) <= 1_000_000
