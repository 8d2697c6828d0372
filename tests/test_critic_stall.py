"""CriticStallDetector: a flat critic (gradient penalty at 1, input-gradient norm at 0) that lasts is reported once,
in the log, in TensorBoard and in the record the model savers write; a short flat start is not a stall."""

import logging
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from bundle.handlers import CriticStallDetector
from bundle.losses import critic_loss_terms

FLAT = {"gp": 0.99, "d_grad_norm": 0.004}
HEALTHY = {"gp": 0.2, "d_grad_norm": 0.7}


class Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def train(detector, phases):
    """Runs an ignite engine whose output follows ``phases`` ([(iterations, output), ...])."""
    outputs = [out for n, out in phases for _ in range(n)]
    engine = Engine(lambda e, _: {k: torch.tensor(v) for k, v in outputs[e.state.iteration - 1].items()})
    detector.attach(engine)
    engine.run(range(len(outputs)), max_epochs=1)


def checks(detector, phases, start):
    """The detector's checks from iteration ``start + 1`` on, as a resumed trainer makes them."""
    outputs = [out for n, out in phases for _ in range(n)]
    for iteration in range(start + 1, len(outputs) + 1):
        if iteration % detector.check_every == 0:
            state = SimpleNamespace(
                iteration=iteration, output={k: torch.tensor(v) for k, v in outputs[iteration - 1].items()}
            )
            detector(SimpleNamespace(state=state))


def test_a_lasting_stall_is_reported_once_and_recorded(caplog):
    writer = Writer()
    detector = CriticStallDetector(window=200, check_every=10, summary_writer=writer)
    with caplog.at_level(logging.INFO, logger="bundle.handlers.critic_stall"):
        train(detector, [(50, HEALTHY), (300, FLAT), (100, HEALTHY)])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "critic stalled: iterations 51-250" in warnings[0].getMessage()
    assert "left its stall at iteration 360" in caplog.text
    assert detector.record() == {"critic_stalls": [[51, 360]], "critic_stall_iterations": 309}
    stalled = {step: value for tag, value, step in writer.scalars if tag == "critic_stalled"}
    assert stalled[240] == 0.0 and stalled[250] == 1.0 and stalled[350] == 1.0 and stalled[360] == 0.0


def test_a_short_flat_start_and_a_large_gradient_are_not_stalls(caplog):
    detector = CriticStallDetector(window=200, check_every=10)
    with caplog.at_level(logging.WARNING, logger="bundle.handlers.critic_stall"):
        train(detector, [(150, FLAT), (300, HEALTHY), (300, {"gp": 1.0, "d_grad_norm": 2.0})])
    assert not caplog.records and detector.record() == {"critic_stalls": [], "critic_stall_iterations": 0}


def test_state_survives_a_resume_mid_stall():
    whole = CriticStallDetector(window=100)
    train(whole, [(20, HEALTHY), (200, FLAT)])
    first = CriticStallDetector(window=100)
    train(first, [(20, HEALTHY), (130, FLAT)])
    resumed = CriticStallDetector(window=100)
    resumed.load_state_dict(first.state_dict())
    checks(resumed, [(20, HEALTHY), (200, FLAT)], start=150)
    assert resumed.record() == whole.record() == {"critic_stalls": [[21, None]], "critic_stall_iterations": 200}


def test_critic_loss_terms_report_the_input_gradient_norm():
    """``d_grad_norm`` is the mean ||grad D|| over the penalty's samples: 0 for a constant critic (gp = 1) and 1
    for D(x) = x . w with |w| = 1 (gp = 0)."""
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    constant = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1))
    torch.nn.init.zeros_(constant[1].weight)
    terms = critic_loss_terms(constant, real, fake)
    assert float(terms["d_grad_norm"]) == 0.0 and float(terms["gp"].detach()) == pytest.approx(1.0)
    torch.nn.init.constant_(constant[1].weight, 0.5)  # |w| = 1
    terms = critic_loss_terms(constant, real, fake)
    assert float(terms["d_grad_norm"]) == pytest.approx(1.0)
    assert float(terms["gp"].detach()) == pytest.approx(0.0, abs=1e-10)
    assert not terms["d_grad_norm"].requires_grad
