# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Argument checks shared by the networks and the engines."""

from __future__ import annotations


def require_bool(**flags: object) -> None:
    """Raises ``TypeError`` naming the first flag that is not a ``bool``: a config or command line that passes the
    string ``"false"`` would otherwise switch the feature on (a non-empty string is truthy)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}.")


def require_autocast_dtype(name: str, dtype: object) -> None:
    """Raises ``ValueError`` unless ``dtype`` is ``None`` (float32) or ``"bfloat16"``: float16 would need loss
    scaling in training (both optimisers and the gradient penalty) and gains nothing over bf16 here."""
    if dtype not in (None, "bfloat16"):
        raise ValueError(f"{name} must be None or 'bfloat16', got {dtype!r} (float16 would need loss scaling).")
