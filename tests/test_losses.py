import torch
from torch import nn

from bundle.losses import SAGANCriticLoss, SAGANGeneratorLoss, critic_loss_terms, generator_loss_terms, gradient_penalty


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


def test_loss_modules_hold_their_weights():
    """The config's loss modules give the terms of the functions with the weights they were built with."""
    d = LinearCritic(torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]]))
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    torch.manual_seed(0)
    terms = SAGANCriticLoss(lambda_gp=7.0)(d, real, fake)
    torch.manual_seed(0)
    assert terms.keys() == {"d_real", "d_fake", "gp", "d_loss", "d_grad_norm"}
    assert torch.equal(terms["d_loss"], critic_loss_terms(d, real, fake, lambda_gp=7.0)["d_loss"])
    images = [torch.randn(3, 1, 2, 2) for _ in range(4)]
    terms = SAGANGeneratorLoss(lambda_identity=2.0, lambda_restoration=5.0)(d, *images)
    expected = generator_loss_terms(d, *images, lambda_identity=2.0, lambda_restoration=5.0)
    assert terms.keys() == expected.keys() == {"g_adv", "g_identity", "g_restoration", "g_loss"}
    assert all(torch.equal(terms[k], expected[k]) for k in terms)
    assert torch.equal(terms["g_loss"], terms["g_adv"] + 2.0 * terms["g_identity"] + 5.0 * terms["g_restoration"])
