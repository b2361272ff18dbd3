"""SCAFFOLD at the site: drift correction and the option-II control-variate update."""

import torch
from torch import nn

from client.scaffold import (
    ScaffoldRound,
    drift_correction,
    load_variate,
    updated_variate,
    variate_path,
)


def _linear():
    torch.manual_seed(0)
    return nn.Linear(2, 1, bias=False)


def test_each_step_uses_gradient_minus_ci_plus_c():
    # Prepare: loss = sum(w) so the plain gradient is exactly 1 for each weight
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w0 = model.weight.detach().clone()
    c = {"weight": torch.tensor([[0.2, -0.4]])}
    c_i = {"weight": torch.tensor([[0.1, 0.1]])}
    # Execute
    with drift_correction(model, opt, c=c, c_i=c_i):
        opt.zero_grad()
        model.weight.sum().backward()
        opt.step()
    # Assert: w1 = w0 - lr * (1 - c_i + c) = w0 - 0.5 * [1.1, 0.5]
    assert torch.allclose(model.weight, w0 - 0.5 * torch.tensor([[1.1, 0.5]]))
    # and the hook is gone afterwards
    opt.zero_grad()
    model.weight.sum().backward()
    w1 = model.weight.detach().clone()
    opt.step()
    assert torch.allclose(model.weight, w1 - 0.5)


def test_option_two_update_by_hand():
    c = {"w": torch.tensor([1.0])}
    c_i = {"w": torch.tensor([0.5])}
    x, y = {"w": torch.tensor([2.0])}, {"w": torch.tensor([1.0])}
    # c_i+ = 0.5 - 1 + (2 - 1) / (4 * 0.25) = 0.5
    new = updated_variate(c=c, c_i=c_i, x=x, y=y, steps=4, learning_rate=0.25)
    assert torch.allclose(new["w"], torch.tensor([0.5]))
    same = updated_variate(c=c, c_i=c_i, x=x, y=y, steps=0, learning_rate=0.25)
    assert torch.equal(same["w"], c_i["w"])


def test_round_persists_the_site_variate_and_replies_its_delta(tmp_path):
    model = _linear()
    path = variate_path(tmp_path, "proj/abc")
    c = {"weight": torch.zeros(1, 2)}
    rnd = ScaffoldRound(model, c=c, path=path)  # first participation: c_i = 0
    with torch.no_grad():
        model.weight -= 0.3  # pretend K=3 steps at lr 0.1 moved every weight by -0.3
    delta = rnd.finish(model, steps=3, learning_rate=0.1)
    # c_i+ = 0 - 0 + 0.3 / 0.3 = 1 for each weight; the delta is the same on first use
    assert torch.allclose(torch.from_numpy(delta["weight"].numpy()), torch.ones(1, 2))
    assert torch.allclose(load_variate(path, model)["weight"], torch.ones(1, 2))
