"""FedProx's proximal term as a loss wrapper (client/proximal.py)."""

import pytest
import torch
from torch import nn

from client.proximal import ProximalLoss
from common.errors import ConfigError


def _zero_loss(outputs, targets):
    return outputs.sum() * 0.0


def test_penalty_is_half_mu_squared_distance_to_the_anchor():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    loss = ProximalLoss(_zero_loss, model=model, mu=0.5)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))  # moved by (1, -2): ||d||^2 = 5
    value = loss(model(torch.ones(1, 2)), torch.zeros(1))
    assert float(value.detach()) == pytest.approx(0.5 / 2 * 5)


def test_gradient_pulls_back_to_the_anchor():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    loss = ProximalLoss(_zero_loss, model=model, mu=2.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    loss(model(torch.ones(1, 1)), torch.zeros(1)).backward()
    assert float(model.weight.grad) == pytest.approx(2.0 * 3.0)  # mu * (w - w_t)


def test_zero_at_the_anchor_and_negative_mu_refused():
    model = nn.Linear(2, 2)
    loss = ProximalLoss(nn.CrossEntropyLoss(), model=model, mu=1.0)
    x, y = torch.ones(3, 2), torch.tensor([0, 1, 0])
    with torch.no_grad():
        assert float(loss(model(x), y)) == pytest.approx(float(nn.CrossEntropyLoss()(model(x), y)))
    with pytest.raises(ConfigError, match="proximal-mu"):
        ProximalLoss(nn.CrossEntropyLoss(), model=model, mu=-1.0)
