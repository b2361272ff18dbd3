"""Model registry: ``get_model(name, **cfg)`` and ``list_models()``.

Every registered model is DP-compatible by construction (GroupNorm, no BatchNorm), so
Opacus's ``ModuleValidator.validate`` accepts it unchanged. Modelled on torchvision's
``get_model`` and MONAI's ``look_up_option``: an unknown name raises with a
"did you mean".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import ModelError, did_you_mean

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    Attributes
    ----------
    name : str
        Registry key.
    task : str
        The task it solves: a name registered in ``common.tasks`` (``classification``,
        ``segmentation``, ...).
    input_shape : tuple[int, ...]
        Expected input shape without the batch dimension, e.g. ``(1, 28, 28)``.
    factory : Callable[..., nn.Module]
        Builds the module from keyword arguments.

    """

    name: str
    task: str
    input_shape: tuple[int, ...]
    factory: Callable[..., nn.Module]


#: Features of the FLamby Fed-Heart-Disease preprocessing (simulation/data/heart.py): 8 numeric
#: columns + 3 chest-pain dummies + 2 resting-ECG dummies.
HEART_FEATURES = 13

#: name -> (task, input shape, factory as "module:function"). Each model's module is
#: imported only when that model is asked for: a ClientApp process building the CNN
#: must not pay for importing MONAI (U-Net) or Opacus's DP layers (GRU/LSTM), and
#: ``common`` stays importable without torch (ingestion installs).
_SPECS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "cnn": ("classification", (1, 28, 28), "common.models.cnn:build_cnn"),
    "gru": ("classification", (1, 28, 28), "common.models.rnn:build_gru"),
    "lstm": ("classification", (1, 28, 28), "common.models.rnn:build_lstm"),
    # Fully convolutional: input_shape is the training patch; any H, W divisible by 16
    # fits (common.tasks.SegmentationTask.check_image_shape).
    "unet": ("segmentation", (1, 32, 32), "common.models.unet:build_unet"),
    "heart-mlp": ("tabular", (HEART_FEATURES, 1, 1), "common.models.mlp:build_heart_mlp"),
    "heart-logreg": ("tabular", (HEART_FEATURES, 1, 1), "common.models.mlp:build_heart_logreg"),
}


_NAMES = tuple(_SPECS)


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_NAMES)


def check_model_name(name: str) -> None:
    """Raise :class:`ModelError` if ``name`` is not registered (no torch import).

    Raises
    ------
    ModelError
        With the valid names and the closest match.

    """
    if name not in _NAMES:
        raise ModelError(
            f"unknown model {name!r}.{did_you_mean(name, _NAMES)} "
            f"Registered models: {list_models()}."
        )


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` of a registered model.

    Raises
    ------
    ModelError
        If ``name`` is not registered.

    """
    check_model_name(name)
    task, input_shape, target = _SPECS[name]
    module_name, attr = target.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return ModelSpec(name, task, input_shape, factory)


def get_model(name: str, **cfg: Any) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name : str
        Registry key, see :func:`list_models`.
    **cfg
        Keyword arguments of the model's factory (e.g. ``num_classes``).

    Returns
    -------
    torch.nn.Module
        A freshly initialised model in float32 on the CPU.

    Raises
    ------
    ModelError
        If ``name`` is not registered.

    """
    return get_spec(name).factory(**cfg)
