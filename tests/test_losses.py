import torch
from torch import nn

from bundle.losses import critic_loss_terms, generator_loss_terms, gradient_penalty


class LinearCritic(nn.Module):
    """D(x) = sum(w * x): its input gradient is w everywhere, so GP = (||w|| - 1)^2 whatever the mixing."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1, keepdim=True)


def test_critic_loss_matches_hand_computation():
    w = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])  # ||w|| = sqrt(5.25)
    d = LinearCritic(w)
    real = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 1.0], [1.0, 0.0]]]])  # D: 0.5, 1.0
    fake = torch.tensor([[[[-1.0, -1.0], [-1.0, -1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # D: -1.5, 1.5
    terms = critic_loss_terms(d, real, fake, lambda_gp=10.0)
    gp = (5.25**0.5 - 1) ** 2
    assert torch.isclose(terms["d_real"], torch.tensor(0.75))
    assert torch.isclose(terms["d_fake"], torch.tensor(0.0))
    assert torch.isclose(terms["gp"], torch.tensor(gp))
    assert torch.isclose(terms["d_loss"], torch.tensor(-0.75 + 0.0 + 10 * gp))


def test_gradient_penalty_zero_for_unit_norm_critic():
    d = LinearCritic(torch.tensor([[[[0.6, 0.8]]]]))
    assert gradient_penalty(d, torch.randn(4, 1, 1, 2), torch.randn(4, 1, 1, 2)).abs() < 1e-10


def test_generator_loss_matches_hand_computation():
    d = LinearCritic(torch.ones(1, 1, 1, 2))
    fake = torch.tensor([[[[1.0, 2.0]]]])  # D = 3
    normal = torch.tensor([[[[0.0, 1.0]]]])
    normal_restored = torch.tensor([[[[0.5, 0.0]]]])  # L1 = (0.5 + 1) / 2
    pseudo_restored = torch.tensor([[[[1.0, 1.0]]]])  # MSE = (1 + 0) / 2
    t = generator_loss_terms(
        d, fake, normal, normal_restored, pseudo_restored, lambda_identity=2.0, lambda_restoration=3.0
    )
    assert torch.isclose(t["g_adv"], torch.tensor(-3.0))
    assert torch.isclose(t["g_identity"], torch.tensor(0.75))
    assert torch.isclose(t["g_restoration"], torch.tensor(0.5))
    assert torch.isclose(t["g_loss"], torch.tensor(-3.0 + 2 * 0.75 + 3 * 0.5))
