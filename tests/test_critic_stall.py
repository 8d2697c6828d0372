"""CriticStallDetector: a flat critic (gradient penalty at 1, input-gradient norm at 0) that lasts is reported once,
in the log, in TensorBoard and in the record the model savers write; a short flat start is not a stall."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from bundle.engines import SAGANTrainer
from bundle.handlers import CriticStallDetector, RestartCritic
from bundle.losses import critic_loss_terms
from bundle.networks import SAGANCritic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert detector.record() == {
        "critic_stalls": [[51, 360]],
        "critic_stall_iterations": 309,
        "critic_stall_remedies": 0,
    }
    stalled = {step: value for tag, value, step in writer.scalars if tag == "critic_stalled"}
    assert stalled[240] == 0.0 and stalled[250] == 1.0 and stalled[350] == 1.0 and stalled[360] == 0.0


def test_a_short_flat_start_and_a_large_gradient_are_not_stalls(caplog):
    detector = CriticStallDetector(window=200, check_every=10)
    with caplog.at_level(logging.WARNING, logger="bundle.handlers.critic_stall"):
        train(detector, [(150, FLAT), (300, HEALTHY), (300, {"gp": 1.0, "d_grad_norm": 2.0})])
    assert not caplog.records and detector.record() == {
        "critic_stalls": [],
        "critic_stall_iterations": 0,
        "critic_stall_remedies": 0,
    }


def test_state_survives_a_resume_mid_stall():
    whole = CriticStallDetector(window=100)
    train(whole, [(20, HEALTHY), (200, FLAT)])
    first = CriticStallDetector(window=100)
    train(first, [(20, HEALTHY), (130, FLAT)])
    resumed = CriticStallDetector(window=100)
    resumed.load_state_dict(first.state_dict())
    checks(resumed, [(20, HEALTHY), (200, FLAT)], start=150)
    assert (
        resumed.record()
        == whole.record()
        == {"critic_stalls": [[21, None]], "critic_stall_iterations": 200, "critic_stall_remedies": 0}
    )


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


def test_the_remedy_runs_once_per_stall_and_a_new_stall_needs_a_new_window(caplog):
    calls = []
    detector = CriticStallDetector(
        window=100, check_every=10, on_stall=lambda engine: calls.append(engine.state.iteration)
    )
    with caplog.at_level(logging.WARNING, logger="bundle.handlers.critic_stall"):
        train(detector, [(20, HEALTHY), (250, FLAT), (30, HEALTHY)])
    # flat from 21: remedy at 120, again after 100 more flat iterations (220), not at 270 (only 50 flat by then)
    assert calls == [120, 220]
    assert detector.record() == {
        "critic_stalls": [[21, 121], [121, 221]],
        "critic_stall_iterations": 200,
        "critic_stall_remedies": 2,
    }
    assert sum("applied the remedy" in r.getMessage() for r in caplog.records) == 2
    resumed = CriticStallDetector(window=100, on_stall=lambda engine: None)
    resumed.load_state_dict(detector.state_dict())
    assert resumed.record() == detector.record()


def test_restart_critic_draws_fresh_weights_and_clears_the_optimiser_in_place():
    torch.manual_seed(0)
    critic = SAGANCritic(conv_dim=4, num_layers=3)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    critic(torch.randn(2, 1, 16, 16)).mean().backward()
    optimizer.step()
    params = list(critic.parameters())
    before = [p.detach().clone() for p in params]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    torch.manual_seed(1)
    RestartCritic(critic, optimizer)()
    torch.manual_seed(1)
    fresh = SAGANCritic(conv_dim=4, num_layers=3)
    assert all(p is q for p, q in zip(params, critic.parameters()))  # same tensors (CUDA graphs, optimiser)
    for p, b, f in zip(critic.parameters(), before, fresh.parameters()):
        assert not torch.equal(p, b)
        assert torch.equal(p, f)  # the layers' own initialisation, from torch's random stream
    assert states and all(not t.any() for t in states)
    assert all(
        t is u for t, u in zip(states, [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)])
    )


@pytest.mark.parametrize(
    "n_critic, warmup, warmup_n_critic, expected",
    [
        (2, 0, 5, [2, 4, 6, 8, 10, 12]),
        (2, 6, 3, [3, 6, 8, 10, 12]),
        (2, 5, 5, [5, 6, 8, 10, 12]),
        (1, 4, 2, [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
    ],
)
def test_generator_steps_follow_the_critic_warmup(n_critic, warmup, warmup_n_critic, expected):
    trainer = SimpleNamespace(
        n_critic=n_critic, critic_warmup_iterations=warmup, critic_warmup_n_critic=warmup_n_critic
    )
    assert [i for i in range(1, 13) if SAGANTrainer.generator_step_due(trainer, i)] == expected


@pytest.mark.parametrize("restart", [False, True])
def test_train_json_wires_the_restart_switch(tmp_path, restart):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.config.update(
        {"bundle_root": ROOT, "output_dir": str(tmp_path), "device": "cpu", "critic_restart_on_stall": restart}
    )
    detector = parser.get_parsed_content("train#critic_stall")
    if not restart:
        assert detector.on_stall is None
        return
    assert isinstance(detector.on_stall, RestartCritic)
    assert detector.on_stall.critic is parser.get_parsed_content("discriminator")
    assert detector.on_stall.optimizer is parser.get_parsed_content("d_optimizer")


def test_kaiming_init_gives_the_critic_an_input_gradient_from_the_start():
    """The stall's cause: with PyTorch's default initialisation the critic's input gradient starts near 0 (the
    penalty at 1); the ``kaiming`` switch starts it hundreds of times larger. A restart keeps the chosen init."""
    torch.manual_seed(0)
    real, fake = torch.rand(8, 1, 64, 64) * 2 - 1, torch.rand(8, 1, 64, 64) * 2 - 1
    norms = {}
    for init in ("default", "kaiming"):
        torch.manual_seed(1)
        critic = SAGANCritic(conv_dim=16, num_layers=6, init=init)
        norms[init] = float(critic_loss_terms(critic, real, fake)["d_grad_norm"])
        RestartCritic(critic, torch.optim.Adam(critic.parameters()))()
        assert float(critic_loss_terms(critic, real, fake)["d_grad_norm"]) == pytest.approx(norms[init], rel=0.5)
    assert norms["default"] < 0.01 < 0.05 < norms["kaiming"]
    with pytest.raises(ValueError, match="init must be"):
        SAGANCritic(init="xavier")
