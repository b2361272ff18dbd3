"""Model registry: ``get_model(name, **cfg)`` and ``list_models()``.

Every registered model is DP-compatible by construction (GroupNorm, no BatchNorm), so
Opacus's ``ModuleValidator.validate`` accepts it unchanged. Modelled on torchvision's
``get_model`` and MONAI's ``look_up_option``: an unknown name raises with a
"did you mean".
"""

from __future__ import annotations

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


def _registry() -> dict[str, ModelSpec]:
    # Imported lazily so `common` stays importable without torch (ingestion installs).
    from common.models.cnn import build_cnn
    from common.models.mlp import HEART_FEATURES, build_heart_logreg, build_heart_mlp
    from common.models.rnn import build_gru, build_lstm
    from common.models.unet import build_unet

    return {
        "cnn": ModelSpec("cnn", "classification", (1, 28, 28), build_cnn),
        "gru": ModelSpec("gru", "classification", (1, 28, 28), build_gru),
        "lstm": ModelSpec("lstm", "classification", (1, 28, 28), build_lstm),
        # Fully convolutional: input_shape is the training patch; any H, W divisible by
        # 16 fits (common.tasks.SegmentationTask.check_image_shape).
        "unet": ModelSpec("unet", "segmentation", (1, 32, 32), build_unet),
        "heart-mlp": ModelSpec("heart-mlp", "tabular", (HEART_FEATURES, 1, 1), build_heart_mlp),
        "heart-logreg": ModelSpec(
            "heart-logreg", "tabular", (HEART_FEATURES, 1, 1), build_heart_logreg
        ),
    }


_NAMES = ("cnn", "heart-mlp", "heart-logreg", "gru", "lstm", "unet")


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
    return _registry()[name]


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
