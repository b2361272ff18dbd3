import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.train import train_epochs
from common.errors import ConfigError
from common.models import get_model
from common.models.rnn import DPRowGRU, RowSequenceClassifier
from common.records import load_record, state_to_record


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_dp_rnn_state_dict_is_that_of_the_plain_torch_layer(name):
    # Prepare
    torch.manual_seed(0)
    dp_model = get_model(name)
    plain = get_model(name, dp_layers=False)
    x = torch.rand(3, 1, 28, 28)
    # Execute
    plain.load_state_dict(dp_model.state_dict())
    # Assert: same names (nn.GRU/LSTM's, no Opacus internals), same function
    assert sorted(dp_model.state_dict()) == sorted(plain.state_dict())
    assert "rnn.weight_ih_l0" in dp_model.state_dict()
    torch.testing.assert_close(dp_model(x), plain(x), atol=1e-5, rtol=1e-4)


def test_gru_round_trips_through_a_flower_record():
    a, b = get_model("gru"), get_model("gru")
    load_record(b, state_to_record(a))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_gru_reads_the_image_row_by_row():
    # Only the last row differs: a row-sequential model sees it as the last time step,
    # so the output changes; identical images give identical outputs.
    model = get_model("gru").eval()
    x = torch.zeros(2, 1, 28, 28)
    x[1, 0, -1] = 1.0
    out = model(x)
    assert not torch.allclose(out[0], out[1])


def test_gru_trains_under_dp_sgd():
    torch.manual_seed(0)
    model = get_model("gru", hidden_size=8)
    x = torch.rand(8, 1, 28, 28)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks",
        )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epochs(model, loader, optimizer=opt, epochs=1, device=torch.device("cpu"))
    assert stats.steps == 2
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_dp_gru_per_sample_gradients_equal_those_of_opacus_dpgru():
    """The hoisted GRU gives Opacus exactly the per-sample gradients of Opacus's DPGRU."""
    from opacus import GradSampleModule
    from opacus.layers import DPGRU

    # Prepare: same weights (nn.GRU names in both state dicts), 5 sequences of 7 steps
    torch.manual_seed(0)
    ours, ref = DPRowGRU(28, 16), DPGRU(28, 16, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    params = {
        "ours": {
            "weight_ih_l0": ours.ih.weight,
            "bias_ih_l0": ours.ih.bias,
            "weight_hh_l0": ours.hh.weight,
            "bias_hh_l0": ours.hh.bias,
        },
        "ref": dict(ref.named_parameters()),
    }
    x = torch.randn(5, 7, 28)
    weights = torch.arange(1.0, 6.0)  # a different loss scale per sample
    # Execute
    for layer in (ours, ref):
        out, h_n = GradSampleModule(layer)(x)
        (weights * (out.pow(2).sum(dim=(1, 2)) + h_n[0].sum(dim=1))).sum().backward()
    # Assert: (N, *param.shape) per-sample gradients agree for every parameter
    for key, p_ours in params["ours"].items():
        assert p_ours.grad_sample.shape == (5, *p_ours.shape)
        torch.testing.assert_close(
            p_ours.grad_sample, params["ref"][key].grad_sample, atol=1e-5, rtol=1e-4
        )


def test_dp_gru_computes_what_torch_gru_computes():
    torch.manual_seed(0)
    ours, plain = DPRowGRU(28, 16), torch.nn.GRU(28, 16, batch_first=True)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(4, 9, 28)
    for a, b in zip(ours(x), plain(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dp_gru_has_one_layer():
    with pytest.raises(ConfigError, match="one layer"):
        RowSequenceClassifier(cell="gru", num_layers=2)
