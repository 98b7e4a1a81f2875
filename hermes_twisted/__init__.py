"""
hermes-twisted: a Twisted gateway between chat platforms and a remote Hermes agent.

The packages, in the order a message flows through them:

  platforms/   the adapter contract (base.py) and one subpackage per platform
  relay/       the relay platform: a WebSocket to a hosted connector
  dispatch/    the Gateway: admission, lanes, runs and generations, commands, turns
  upstream/    the Hermes API server a turn runs on (proxy mode, SSE)
  delivery/    streamed answers into chat messages: consumer, layout, pacing, splitting
  sessions/    session keys and the durable store
  fleet/       several processes on one PostgreSQL store: leases, fencing, the shared inbox

and below them all: config/ (the frozen settings), net/ (HTTP and reconnect plumbing) and
model.py (the platform-neutral message model).  At the top: tap.py (the twistd command
line and service wiring), service.py (the root service), cli.py (the admin console script).
tests/test_architecture.py enforces which package may import which.
"""

__version__ = "0.1.0"
