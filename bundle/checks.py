# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Argument checks shared by the networks and the engines."""

from __future__ import annotations


def require_bool(**flags: object) -> None:
    """Raises ``TypeError`` naming the first flag that is not a ``bool``: a config or command line that passes the
    string ``"false"`` would otherwise switch the feature on (a non-empty string is truthy)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}.")
