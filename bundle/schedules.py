# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The authors' learning-rate "decay" as a ``LambdaLR`` factor (the published training code; paper, Sec. 3.1)."""

from __future__ import annotations

__all__ = ["AuthorsLinearDecay"]


class AuthorsLinearDecay:
    """lr factor after ``t`` iterations: every ``update_every`` iterations within the last ``decay_iterations``
    of ``total_iterations``, ``1 / decay_iterations`` of the initial lr is removed. With the paper's numbers
    (100k, 50k, 1000) the lr ends at 0.999 of its start: practically constant, as in the authors' code.
    Use as ``LambdaLR(optimizer, AuthorsLinearDecay(...))`` stepped once per iteration."""

    def __init__(self, total_iterations: int, decay_iterations: int, update_every: int = 1000) -> None:
        self.total_iterations = total_iterations
        self.decay_iterations = decay_iterations
        self.update_every = update_every

    def __call__(self, t: int) -> float:
        if self.decay_iterations <= 0:
            return 1.0
        start = (self.total_iterations - self.decay_iterations) // self.update_every
        steps = max(0, t // self.update_every - start)
        return max(0.0, 1.0 - steps / self.decay_iterations)
