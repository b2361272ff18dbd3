import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.train import train_epochs
from common.errors import ConfigError
from common.models import get_model
from common.tasks import get_task


def test_unet_keeps_spatial_size_and_outputs_one_logit_per_class():
    model = get_model("unet", num_classes=3)
    out = model(torch.zeros(2, 1, 48, 64))
    assert out.shape == (2, 3, 48, 64)


def test_unet_rejects_width_not_divisible_by_groups():
    from common.models.unet import UNet2d

    with pytest.raises(ConfigError, match="divisible by groups"):
        UNet2d(width=10, groups=4)


def _private_unet_step(*, amp: bool = False, dp: bool = True):
    torch.manual_seed(0)
    model = get_model("unet", width=4, depth=2)
    x = torch.rand(8, 1, 16, 16)
    y = (x[:, 0] > 0.7).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if dp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, loader = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks",
            )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epochs(
        model, loader, optimizer=opt, epochs=1, device=torch.device("cpu"),
        criterion=get_task("segmentation").make_loss(), amp=amp,
    )  # fmt: skip
    return model, before, stats


def test_unet_trains_under_dp_sgd_with_per_sample_gradients_for_every_parameter():
    # Execute: Opacus hooks must cover every trainable layer (no ConvTranspose / PReLU)
    model, before, stats = _private_unet_step()
    # Assert
    assert stats.steps == 2 and stats.examples == 8
    assert all(p.grad_sample is None or p.grad_sample.shape[0] == 4 for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_amp_training_runs_in_bfloat16_on_cpu_without_dp():
    model, _, stats = _private_unet_step(amp=True, dp=False)
    assert stats.steps == 2 and torch.isfinite(torch.tensor(stats.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
