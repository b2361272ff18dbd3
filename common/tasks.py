"""Learning tasks: what a model's outputs mean, how they are trained, checked and scored.

A :class:`Task` ties together the four things that differ between, e.g., image
classification and segmentation, so that the training loop, the ClientApp, the server's
held-out evaluation and ``medfed evaluate`` stay one code path each:

* :meth:`Task.make_loss` -- the training loss, **per-sample separable**: the batch loss is
  the mean over the batch of a per-sample loss, ``L = (1/B) sum_i l(x_i, y_i)``. DP-SGD
  (Opacus, ``loss_reduction="mean"``) relies on this to clip each sample's gradient.
* :meth:`Task.evaluate` -- batched inference and metrics on (memory-mapped) arrays.
* :meth:`Task.check_dataset` -- whether a site dataset fits the model and run config.
* :attr:`Task.headline` -- the metric keys a summary table shows first.

Registry with :func:`get_task` / :func:`list_tasks` and a "did you mean" error, like the
model registry. Registered tasks:

``classification``
    labels int64 ``(N,)``; model output logits ``(N, K)``; cross-entropy loss;
    :func:`common.metrics.classification_metrics` (accuracy, AUROC, ...).
``segmentation``
    labels int64 masks ``(N, H, W)`` with values in ``[0, K)`` (``num-classes`` counts the
    background: ``2`` = background / foreground, e.g. background / vessel); model output
    logits ``(N, K, H, W)``; Dice + cross-entropy loss (MONAI ``DiceCELoss``, per image);
    metrics from :func:`common.metrics.segmentation_metrics` (Dice, pixel accuracy).

Adding a task: subclass :class:`Task`, call :func:`register_task` with an instance in
this module (or in a module imported here) and add its name to ``common.config.TASKS``.

Imports torch and MONAI; ``common.config`` keeps its own list of task names
(``TASKS``, checked against this registry by tests) so parsing config stays light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from common.config import EVAL_BATCH_SIZE
from common.errors import ConfigError, DataError, did_you_mean
from common.evaluation import evaluate_segmentation, metrics_from_proba, predict_proba

if TYPE_CHECKING:
    from common.site_dataset import SiteDataset

#: A training loss: ``(outputs, targets) -> scalar`` mean over the batch of per-sample losses.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Task(ABC):
    """One learning task (see the module docstring).

    Subclasses set :attr:`name` and :attr:`headline` and implement the abstract methods.
    """

    #: Registry key, also the ``task`` of site datasets and ``ModelSpec.task``.
    name: ClassVar[str]
    #: Metric keys (as returned by :meth:`evaluate`) that summaries show first.
    headline: ClassVar[tuple[str, ...]]
    #: What ``label_counts`` in a site manifest count: ``"images"`` or ``"pixels"``.
    label_unit: ClassVar[str]

    @abstractmethod
    def make_loss(self, *, class_weights: torch.Tensor | None = None) -> nn.Module:
        """Return the training loss module ``loss(outputs, targets) -> scalar``.

        The loss must be the batch mean of a per-sample loss (DP-SGD requirement).

        Parameters
        ----------
        class_weights : torch.Tensor, optional
            float ``(K,)`` per-class weights of each example's loss (run config
            ``class-weighting``, :mod:`common.imbalance`); None = unweighted.

        Raises
        ------
        ConfigError
            If the task does not support ``class_weights``.
        """

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int = EVAL_BATCH_SIZE,
        device: torch.device,
    ) -> dict[str, float]:
        """Score ``model`` on arrays of one split.

        Parameters
        ----------
        model : torch.nn.Module
            Maps float32 ``(B, C, H, W)`` to logits (``(B, K)``, or ``(B, K, H, W)``
            for segmentation); put in eval mode here.
        images : numpy.ndarray
            float32 ``(N, C, H, W)`` in ``[0, 1]`` (may be memory-mapped).
        labels : numpy.ndarray
            int ``(N,)`` class indices, or ``(N, H, W)`` masks for segmentation.
        batch_size, device
            Images per forward pass (run config ``eval-batch-size``) and where to run the
            model, as in :func:`common.evaluation.predict_proba`.

        Returns
        -------
        dict[str, float]
            ``loss`` (mean training loss over images), ``num-examples`` (images) and the
            task's metrics; undefined values are NaN.

        """

    def check_dataset(self, data: SiteDataset, *, model: str, num_classes: int) -> None:
        """Raise :class:`DataError` if ``data`` does not fit ``model`` / ``num_classes``.

        Checks (all tasks): the dataset's task equals this task and the model's
        ``ModelSpec.task``; the number of label names equals ``num-classes``; and the
        image shape via :meth:`check_image_shape`.

        Raises
        ------
        DataError
            Naming what differs and how to fix it.

        """
        from common.models import get_spec

        spec = get_spec(model)
        if data.task != self.name or spec.task != self.name:
            raise DataError(
                f"site dataset task {data.task!r} does not match run task {self.name!r} / "
                f"model {model!r} ({spec.task}); set run config 'task' and 'model' to match "
                "the site datasets."
            )
        if len(data.label_names) != num_classes:
            raise DataError(
                f"site dataset has {len(data.label_names)} classes, run config 'num-classes' "
                f"is {num_classes}."
            )
        self.check_image_shape(data.image_shape, spec_shape=spec.input_shape, model=model)

    def check_image_shape(
        self, shape: tuple[int, ...], *, spec_shape: tuple[int, ...], model: str
    ) -> None:
        """Default rule: the site's ``(C, H, W)`` equals the model's ``input_shape``."""
        if tuple(shape) != tuple(spec_shape):
            raise DataError(
                f"site images are {tuple(shape)}, model {model!r} expects {tuple(spec_shape)}; "
                "re-ingest with the model's input size."
            )


class ClassificationTask(Task):
    """Image-level classification: cross-entropy, :func:`classification_metrics`."""

    name = "classification"
    headline = ("accuracy", "auroc")
    label_unit = "images"

    def make_loss(self, *, class_weights: torch.Tensor | None = None) -> nn.Module:
        """``torch.nn.CrossEntropyLoss()`` (batch mean of per-sample cross-entropy).

        With ``class_weights``, :class:`common.imbalance.WeightedCrossEntropyLoss`: each
        example's cross-entropy times its class's weight, averaged over the batch (not
        ``CrossEntropyLoss(weight=...)``, whose mean divides by the batch's weight sum
        and so is not per-sample separable).
        """
        if class_weights is not None:
            from common.imbalance import WeightedCrossEntropyLoss

            return WeightedCrossEntropyLoss(class_weights)
        return nn.CrossEntropyLoss(reduction="mean")

    def evaluate(
        self,
        model: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int = EVAL_BATCH_SIZE,
        device: torch.device,
    ) -> dict[str, float]:
        """Cross-entropy ``loss`` and :func:`common.metrics.classification_metrics`.

        Probabilities from :func:`common.evaluation.predict_proba`, scored by
        :func:`common.evaluation.metrics_from_proba`.
        """
        probs = predict_proba(model, images, batch_size=batch_size, device=device)
        return metrics_from_proba(labels, probs)


class SegmentationTask(Task):
    """Semantic segmentation: Dice + cross-entropy loss, Dice and pixel accuracy.

    Models map ``(N, C, H, W)`` to logits ``(N, K, H, W)``; masks are int64 ``(N, H, W)``.
    Fully convolutional models accept any ``H, W`` divisible by :attr:`divisor`, so a site
    dataset of the model's channel count and such a size fits (patches for training,
    whole images or tiles for evaluation).
    """

    name = "segmentation"
    headline = ("dice", "pixel-accuracy")
    label_unit = "pixels"
    #: Spatial sizes must be multiples of this (up to four 2x poolings, common.models.unet).
    divisor = 16

    def make_loss(self, *, class_weights: torch.Tensor | None = None) -> nn.Module:
        """:class:`DiceCELoss`: mean over images of (soft Dice loss + cross-entropy).

        Raises
        ------
        ConfigError
            If ``class_weights`` is given: per-pixel class weighting is not implemented.
        """
        if class_weights is not None:
            raise ConfigError(
                "class weighting is for image-level classification; the segmentation loss "
                "(Dice + cross-entropy) takes no class weights: set class-weighting='none'."
            )
        return DiceCELoss()

    def check_image_shape(
        self, shape: tuple[int, ...], *, spec_shape: tuple[int, ...], model: str
    ) -> None:
        """Channels must equal the model's; ``H`` and ``W`` multiples of :attr:`divisor`."""
        if len(shape) != 3 or shape[0] != spec_shape[0]:
            raise DataError(
                f"site images are {tuple(shape)}, model {model!r} expects {spec_shape[0]} "
                f"channel(s) (C, H, W); re-create the site dataset with that many channels."
            )
        if shape[1] % self.divisor or shape[2] % self.divisor:
            raise DataError(
                f"site images are {shape[1]} x {shape[2]}; model {model!r} needs height and "
                f"width divisible by {self.divisor}; re-create the site dataset with e.g. "
                f"{self.divisor * max(1, round(shape[1] / self.divisor))} pixels."
            )

    def evaluate(
        self,
        model: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int = EVAL_BATCH_SIZE,
        device: torch.device,
    ) -> dict[str, float]:
        """:func:`common.evaluation.evaluate_segmentation`."""
        return evaluate_segmentation(
            model, images, labels, batch_size=batch_size, device=device, loss=self.make_loss()
        )


class DiceCELoss(nn.Module):
    """Per-image Dice + cross-entropy loss for ``(logits (B, K, H, W), masks (B, H, W))``.

    MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=False)``: the soft Dice
    loss (Milletari et al., V-Net, 3DV 2016) is computed per image and per class
    (background included, smoothing 1e-5) and averaged; the cross-entropy is the mean
    over all ``B*H*W`` pixels. With equal image sizes both are the batch mean of a
    per-image loss, which is what DP-SGD's per-sample clipping needs
    (tests/common/test_tasks.py checks it).
    """

    def __init__(self) -> None:
        super().__init__()
        # Imported here: MONAI takes ~1 s to import, which every ClientApp process of a
        # classification run would pay for nothing (one process per Flower message).
        from monai.losses.dice import DiceCELoss as MonaiDiceCELoss

        self.inner = MonaiDiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Scalar loss; ``masks`` int64 ``(B, H, W)`` with values in ``[0, K)``."""
        out: torch.Tensor = self.inner(logits, masks.unsqueeze(1))
        return out


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Add ``task`` to the registry under ``task.name``.

    Raises
    ------
    ValueError
        If another task object is already registered under that name.

    """
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task


class TabularTask(ClassificationTask):
    """Classification of tabular records (e.g. UCI Heart Disease, simulation/data/heart.py).

    Site-dataset contract: features stored as float32 ``(N, F, 1, 1)`` "images" (already
    standardised, so not limited to ``[0, 1]``: ``SplitArrays.create(unit_range=False)``),
    labels int64 ``(N,)``; models flatten the input (common/models/mlp.py). Loss and
    metrics are those of :class:`ClassificationTask`; the shape rule is the default one
    (``(F, 1, 1)`` equals the model's ``input_shape``).
    """

    name = "tabular"
    headline = ("accuracy", "auroc")
    label_unit = "records"


register_task(ClassificationTask())
register_task(SegmentationTask())
register_task(TabularTask())


def list_tasks() -> list[str]:
    """Return the registered task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """Return the registered :class:`Task` called ``name``.

    Raises
    ------
    ConfigError
        Unknown name, with the registered names and the closest match.

    """
    if name not in _TASKS:
        raise ConfigError(
            f"unknown task {name!r}.{did_you_mean(name, _TASKS)} Registered tasks: {list_tasks()}."
        )
    return _TASKS[name]
