import numpy as np
import torch

from client.train import make_optimizer, make_train_loader, train_epochs
from common.models import get_model
from common.site_dataset import SplitArrays


def test_training_reduces_loss_on_separable_images():
    # Prepare: class 1 = bright images, class 0 = dark images
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    images = 0.2 + 0.6 * labels[:, None, None, None] + 0.05 * rng.random((64, 1, 28, 28))
    split = SplitArrays.create(images.clip(0, 1), labels)
    torch.manual_seed(0)
    model = get_model("cnn")
    opt = make_optimizer(model, learning_rate=0.05, momentum=0.9, weight_decay=0.0)
    device = torch.device("cpu")
    # Execute
    first = train_epochs(
        model,
        make_train_loader(split, batch_size=16, generator=torch.Generator().manual_seed(0)),
        optimizer=opt,
        epochs=1,
        device=device,
    )
    later = train_epochs(
        model,
        make_train_loader(split, batch_size=16, generator=torch.Generator().manual_seed(1)),
        optimizer=opt,
        epochs=3,
        device=device,
    )
    # Assert
    assert first.steps == 4 and first.examples == 64
    assert later.steps == 12
    assert later.loss < first.loss
