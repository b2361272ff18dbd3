"""The GPU path: the same code as the CPU tests in test_models_unet/rnn.py and test_tasks.py
(which run in the default suite), here on CUDA. Skipped without a GPU."""

import numpy as np
import pytest
import torch

from client.train import make_optimizer, make_train_loader, train_epochs
from common.device import resolve_device
from common.models import get_model
from common.site_dataset import SplitArrays
from common.tasks import get_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _masks_split(n=16, size=32):
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, size, size)).astype(np.float32)
    return SplitArrays.create(images, (images[:, 0] > 0.7).astype(np.int64))


def test_unet_trains_on_cuda_from_pinned_memory_with_dp():
    from opacus import PrivacyEngine

    device = resolve_device("auto")
    torch.manual_seed(0)
    model = get_model("unet").to(device)
    loader = make_train_loader(
        _masks_split(), batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert loader.pin_memory
    opt = make_optimizer(model, learning_rate=0.1, momentum=0.9, weight_decay=0.0)
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5,
        max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="hooks",
    )  # fmt: skip
    stats = train_epochs(
        model, loader, optimizer=opt, epochs=1, device=device,
        criterion=get_task("segmentation").make_loss(),
    )  # fmt: skip
    assert np.isfinite(stats.loss)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_gru_trains_on_cuda_in_bfloat16_without_dp():
    device = resolve_device("cuda")
    model = get_model("gru").to(device)
    split = SplitArrays.create(np.random.default_rng(1).random((16, 1, 28, 28)), np.arange(16) % 2)
    loader = make_train_loader(split, batch_size=8, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(model, learning_rate=0.05, momentum=0.9, weight_decay=0.0)
    stats = train_epochs(model, loader, optimizer=opt, epochs=1, device=device, amp=True)
    assert stats.steps == 2 and np.isfinite(stats.loss)


def test_segmentation_metrics_are_the_same_on_cuda_and_cpu():
    torch.manual_seed(0)
    model = get_model("unet")
    split = _masks_split(n=4, size=48)
    cpu = get_task("segmentation").evaluate(
        model, split.images, split.labels, device=torch.device("cpu")
    )
    gpu = get_task("segmentation").evaluate(
        model, split.images, split.labels, device=torch.device("cuda")
    )
    assert gpu["pixel-accuracy"] == pytest.approx(cpu["pixel-accuracy"], abs=1e-3)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
