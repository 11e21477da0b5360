"""What the compatibility scripts share: a failure type, step headings, and expectations.

Each script runs as `python3 tests/compat/NAME.py ...`, so this folder is on its import path.
"""

from __future__ import annotations


class Failed(AssertionError):
    """A step did not behave as it does against the real server."""


def step(msg: str) -> None:
    print(f"- {msg}", flush=True)


def expect(cond: bool, what: str, got=None) -> None:
    if not cond:
        raise Failed(f"{what}; got: {got!r}")
