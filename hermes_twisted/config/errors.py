# -*- test-case-name: tests.test_config -*-
"""The operator-input errors: L{ConfigError} (the loader) and L{UsageError} (admin commands)."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem: C{key} is a dotted YAML key, an env var name or a file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


class UsageError(Exception):
    """
    A bad command-line argument or configuration given to an admin command
    (L{hermes_twisted.cli}): the command exits 2 with this message, never a traceback.
    """
