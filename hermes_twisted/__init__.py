"""hermes-twisted: a Twisted gateway between chat platforms and a remote Hermes agent."""

__version__ = "0.1.0"
