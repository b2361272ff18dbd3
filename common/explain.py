"""Saliency figures for a classifier: which pixels drove each prediction.

:func:`explain_arrays` predicts a whole split, picks up to ``n`` cases (half predicted
right, half wrong when the split has them; seeded, so the same call picks the same
images), computes one saliency map per picked image and writes a PNG grid of the images
with the maps overlaid, plus a JSON list of what was shown.

Methods (MONAI ``monai.visualize``):

``grad-cam``
    Gradient-weighted class activation mapping (Selvaraju et al., "Grad-CAM: Visual
    Explanations from Deep Networks via Gradient-based Localization", ICCV 2017,
    https://doi.org/10.1109/ICCV.2017.74) with :class:`monai.visualize.GradCAM` at the
    model's **last** ``torch.nn.Conv2d`` layer (found by :func:`last_conv_layer`), for the
    predicted class. Used for every model that has a 2-D convolution: ``cnn``.
``occlusion``
    Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding
    Convolutional Networks", ECCV 2014, https://doi.org/10.1007/978-3-319-10590-1_53) with
    :class:`monai.visualize.OcclusionSensitivity`: the drop of the predicted class's
    probability when a Gaussian-weighted patch around each pixel is blacked out. Used for
    image classifiers without convolutions: ``gru``, ``lstm`` (rows as time steps).

Supported: image classification models (task ``classification``, input ``(C, H, W)`` with
``H, W >= 4``). Not supported, with a :class:`~common.errors.ConfigError` saying so:
segmentation models (``unet``: their output is already a per-pixel map) and tabular
models (``heart-mlp``, ``heart-logreg``: no image to overlay).

Decision rule: binary tasks predict class 1 when ``p(class 1) >= threshold``; the
threshold is the checkpoint's ``threshold`` field when it has one, else 0.5 (see
:func:`decision_threshold`); more than two classes use the arg-max.

The figure uses matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), so no
display and no global pyplot state are needed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Saliency methods by name.
METHODS = ("grad-cam", "occlusion")
#: Threshold used for binary tasks when the checkpoint carries none.
DEFAULT_THRESHOLD = 0.5
#: ``format`` of the JSON written beside the figure.
EXPLAIN_FORMAT = "medfed-explain"
EXPLAIN_VERSION = 1
#: Grid columns of the figure.
COLUMNS = 4


@dataclass(frozen=True)
class Decision:
    """How probabilities become a predicted class.

    Attributes
    ----------
    threshold : float or None
        Binary tasks: predict class 1 when ``p(class 1) >= threshold``. ``None`` for
        more than two classes (arg-max).
    source : str
        ``"checkpoint"`` (the checkpoint's ``threshold`` field), ``"default"``
        (:data:`DEFAULT_THRESHOLD`, the checkpoint has none) or ``"argmax"``.

    """

    threshold: float | None
    source: str

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class of each row of float ``(N, K)`` probabilities -> int64 ``(N,)``."""
        if self.threshold is None:
            return np.asarray(probs.argmax(axis=1), dtype=np.int64)
        return (probs[:, 1] >= self.threshold).astype(np.int64)

    def describe(self, label_names: Sequence[str]) -> str:
        """One line for a figure title, e.g. ``p(pneumonia) >= 0.5 (default)``."""
        if self.threshold is None:
            return "decision: arg-max over classes"
        positive = label_names[1] if len(label_names) > 1 else "class 1"
        origin = "from the checkpoint" if self.source == "checkpoint" else "default, none saved"
        return f"decision: p({positive}) >= {self.threshold:g} ({origin})"


def decision_threshold(checkpoint: Any, num_classes: int) -> Decision:
    """Return the :class:`Decision` rule for a checkpoint's classifier.

    Parameters
    ----------
    checkpoint : common.checkpoint.Checkpoint
        Read for an optional ``operating_point`` (its ``threshold``, chosen on the sites'
        pooled validation; binary tasks); checkpoints without one use 0.5.
    num_classes : int
        ``K``, the model's number of outputs.

    Raises
    ------
    ConfigError
        If the checkpoint's threshold is not a number in ``(0, 1)``.

    """
    if num_classes != 2:
        return Decision(None, "argmax")
    op = getattr(checkpoint, "operating_point", None)
    raw = op.get("threshold") if isinstance(op, dict) else None
    if raw is None:
        return Decision(DEFAULT_THRESHOLD, "default")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ConfigError(f"checkpoint threshold={raw!r} must be a probability in (0, 1)")
    return Decision(value, "checkpoint")


def select_cases(correct: np.ndarray, *, n: int, seed: int) -> np.ndarray:
    """Pick up to ``n`` indices: ``n // 2`` wrong and the rest right, when available.

    If one kind is short, the other fills the remaining places. Within each kind the
    indices are drawn without replacement by ``numpy.random.default_rng(seed)`` (right
    ones first, then wrong ones), then sorted.

    Parameters
    ----------
    correct : numpy.ndarray
        bool ``(N,)``: whether each image's prediction is right.
    n : int
        Images wanted (>= 1).
    seed : int
        Seed of the generator; equal inputs and seed give equal picks.

    Returns
    -------
    numpy.ndarray
        int64 ``(min(n, N),)``: the picked right cases (ascending), then the wrong ones.

    Raises
    ------
    ConfigError
        If ``n < 1``.

    """
    if n < 1:
        raise ConfigError(f"n={n} must be >= 1 (images in the figure)")
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    k_wrong = min(wrong.size, n // 2)
    k_right = min(right.size, n - k_wrong)
    k_wrong = min(wrong.size, n - k_right)
    rng = np.random.default_rng(seed)
    pick_right = np.sort(rng.choice(right, size=k_right, replace=False))
    pick_wrong = np.sort(rng.choice(wrong, size=k_wrong, replace=False))
    return np.concatenate([pick_right, pick_wrong]).astype(np.int64)


def last_conv_layer(model: nn.Module) -> str | None:
    """Name (as in ``model.named_modules()``) of the last ``torch.nn.Conv2d``, or ``None``.

    "Last" is registration order, which for the registered models is the order of the
    forward pass (e.g. ``"features.4"`` for ``cnn``).
    """
    name: str | None = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            name = module_name
    return name


def choose_method(
    model: nn.Module, *, task: str, input_shape: Sequence[int]
) -> tuple[str, str | None]:
    """Return ``(method, target_layer)`` for a model, or raise if it cannot be explained.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.
    task : str
        The checkpoint's task; only ``"classification"`` is supported.
    input_shape : Sequence[int]
        The image shape ``(C, H, W)`` the model receives.

    Returns
    -------
    tuple[str, str or None]
        ``("grad-cam", layer name)`` when the model has a ``Conv2d``, else
        ``("occlusion", None)``.

    Raises
    ------
    ConfigError
        For a task other than classification, or inputs that are not images with
        ``H, W >= 4``, naming what is supported.

    """
    if task != "classification":
        raise ConfigError(
            f"explain supports image classification models (Grad-CAM for cnn; occlusion "
            f"sensitivity for gru, lstm); this checkpoint's task is {task!r} (segmentation "
            "models already output a per-pixel map; tabular models have no image)."
        )
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ConfigError(
            f"explain needs images (C, H, W) with H, W >= 4; the model reads {tuple(input_shape)}"
        )
    layer = last_conv_layer(model)
    return ("grad-cam", layer) if layer is not None else ("occlusion", None)


def _unit_range(maps: np.ndarray) -> np.ndarray:
    """Min-max scale each map of ``(B, 1, H, W)`` to ``[0, 1]`` (1 = most important).

    MONAI's default CAM post-processing maps (min, max) to (1, 0), i.e. inverts the
    maps; this keeps the usual orientation. A constant map becomes all zeros.
    """
    out = np.zeros_like(maps, dtype=np.float32)
    for i, m in enumerate(maps):
        lo, hi = float(m.min()), float(m.max())
        if hi > lo:
            out[i] = (m - lo) / (hi - lo)
    return out


def saliency_maps(
    model: nn.Module,
    images: np.ndarray,
    classes: np.ndarray,
    *,
    method: str,
    target_layer: str | None = None,
    device: torch.device,
) -> np.ndarray:
    """One saliency map per image for the given class, scaled to ``[0, 1]``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier ``(B, C, H, W) -> (B, K)`` logits. A deep copy receives MONAI's hooks,
        so ``model`` itself is left unchanged.
    images : numpy.ndarray
        float32 ``(B, C, H, W)`` as the model reads them (``[0, 1]``).
    classes : numpy.ndarray
        int ``(B,)``: the class to explain for each image (usually the predicted one).
    method : str
        ``"grad-cam"`` (needs ``target_layer``) or ``"occlusion"``.
    target_layer : str or None
        Module name for Grad-CAM, see :func:`last_conv_layer`.
    device : torch.device
        Where to run the model.

    Returns
    -------
    numpy.ndarray
        float32 ``(B, H, W)`` in ``[0, 1]``, 1 = most important for that class: Grad-CAM
        upsampled to the image size and min-max scaled per image; occlusion: the drop
        ``p - p_occluded`` of the class probability when a patch around the pixel is
        occluded, min-max scaled per image (1 = occluding there lowers it most, 0 = raises
        it most or lowers it least).

    Raises
    ------
    ConfigError
        Unknown ``method``, or Grad-CAM without ``target_layer``.

    """
    from monai.visualize.class_activation_maps import GradCAM
    from monai.visualize.occlusion_sensitivity import OcclusionSensitivity

    if method not in METHODS:
        raise ConfigError(f"unknown saliency method {method!r}; use one of {list(METHODS)}")
    net = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = np.zeros((x_all.shape[0], 1, *x_all.shape[2:]), dtype=np.float32)
    if method == "grad-cam":
        if target_layer is None:
            raise ConfigError("grad-cam needs target_layer (see common.explain.last_conv_layer)")
        cam = GradCAM(nn_module=net, target_layers=target_layer, postprocessing=lambda m: m)
        for i in range(x_all.shape[0]):
            x = x_all[i : i + 1].to(device)
            out[i] = cam(x, class_idx=int(classes[i])).detach().cpu().numpy()[0]
        return _unit_range(out)[:, 0]
    h, w = int(x_all.shape[2]), int(x_all.shape[3])
    mask = (max(3, h // 4), max(3, w // 4))
    occ = OcclusionSensitivity(
        nn_module=net, mask_size=mask, n_batch=64, verbose=False, overlap=0.5
    )
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.6 indexes tensors with lists, which torch >= 2.9 deprecates (same result).
        warnings.filterwarnings(
            "ignore", message="Using a non-tuple sequence for multidimensional indexing"
        )
        for i in range(x_all.shape[0]):
            x = x_all[i : i + 1].to(device)
            c = int(classes[i])
            p = float(torch.softmax(net(x).float(), dim=1)[0, c])
            occ_map, _ = occ(x)  # (1, K, H, W): class probabilities with patches occluded
            out[i, 0] = (p - occ_map[0, c].detach().cpu().numpy()).astype(np.float32)
    return _unit_range(out)[:, 0]


@dataclass(frozen=True)
class ExplainResult:
    """What :func:`explain_arrays` wrote and showed.

    Attributes
    ----------
    png, json : pathlib.Path
        The figure and its description (same stem).
    method : str
        ``"grad-cam"`` or ``"occlusion"``.
    target_layer : str or None
        Grad-CAM layer.
    decision : Decision
        Threshold rule used.
    indices : numpy.ndarray
        int64 ``(n,)`` split indices shown, in figure order.
    correct : numpy.ndarray
        bool ``(n,)``.
    label_names : tuple[str, ...]
        Class names used in the titles.

    """

    png: Path
    json: Path
    method: str
    target_layer: str | None
    decision: Decision
    indices: np.ndarray
    correct: np.ndarray
    label_names: tuple[str, ...] = ()


def _name(label_names: Sequence[str], c: int) -> str:
    return label_names[c] if 0 <= c < len(label_names) else f"class {c}"


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``(C, H, W)`` in [0, 1] -> what ``imshow`` takes, and the colour map (grey or RGB)."""
    if image.shape[0] == 3:
        return np.clip(image.transpose(1, 2, 0), 0.0, 1.0), None
    return image[0], "gray"


def plot_grid(
    images: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str],
    colors: Sequence[str],
    *,
    suptitle: str,
    path: Path,
) -> Path:
    """Write a PNG grid: each image in grey (or RGB) with its map overlaid (jet, 40 %).

    Parameters
    ----------
    images : numpy.ndarray
        float32 ``(n, C, H, W)`` in ``[0, 1]``.
    maps : numpy.ndarray
        float32 ``(n, H, W)`` in ``[0, 1]``.
    titles, colors : Sequence[str]
        Per tile: title text and its matplotlib colour.
    suptitle : str
        Figure title.
    path : pathlib.Path
        Output ``.png``.

    Returns
    -------
    pathlib.Path
        ``path``.

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = int(images.shape[0])
    cols = min(COLUMNS, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        shown, cmap = _display(images[i])
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(maps[i], cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.set_title(titles[i], fontsize=8, color=colors[i])
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _checked_labels(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as int64 ``(N,)``; raise DataError unless they match ``images``."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)} must be "
            "(N, C, H, W) and (N,)"
        )
    if labels.size == 0:
        raise DataError("the split is empty: nothing to explain")
    return labels


def _describe_cases(
    picked: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    correct: np.ndarray,
    label_names: Sequence[str],
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Return the JSON item, the figure title and the title colour of each picked case."""
    items: list[dict[str, Any]] = []
    titles, colors = [], []
    for idx in picked.tolist():
        p, t = int(pred[idx]), int(labels[idx])
        items.append(
            {
                "index": idx,
                "true": t,
                "true-name": _name(label_names, t),
                "predicted": p,
                "predicted-name": _name(label_names, p),
                "probability": round(float(probs[idx, p]), 6),
                "probabilities": [round(float(v), 6) for v in probs[idx]],
                "correct": bool(correct[idx]),
            }
        )
        titles.append(
            f"#{idx} {'right' if correct[idx] else 'WRONG'}\n"
            f"true: {_name(label_names, t)}\n"
            f"pred: {_name(label_names, p)} (p={probs[idx, p]:.2f})"
        )
        colors.append("darkgreen" if correct[idx] else "crimson")
    return items, titles, colors


def _write_outputs(
    shown: np.ndarray,
    maps: np.ndarray,
    titles: list[str],
    colors: list[str],
    *,
    out_dir: Path,
    stem: str,
    title: str,
    method: str,
    layer: str | None,
    decision: Decision,
    label_names: Sequence[str],
    meta: Mapping[str, Any] | None,
    seed: int,
    split: tuple[int, int],
    items: list[dict[str, Any]],
) -> tuple[Path, Path]:
    """Write the figure ``<stem>.png`` and its record ``<stem>.json``; return both paths."""
    how = f"Grad-CAM at {layer}" if method == "grad-cam" else "occlusion sensitivity"
    suptitle = "\n".join(
        s
        for s in (
            title,
            f"{how} of the predicted class (red = more important); "
            f"{decision.describe(label_names)}",
        )
        if s
    )
    png = plot_grid(shown, maps, titles, colors, suptitle=suptitle, path=out_dir / f"{stem}.png")
    record = {
        "format": EXPLAIN_FORMAT,
        "version": EXPLAIN_VERSION,
        **dict(meta or {}),
        "method": method,
        "target-layer": layer,
        "threshold": decision.threshold,
        "threshold-source": decision.source,
        "seed": seed,
        "label-names": list(label_names),
        "split-size": split[0],
        "split-correct": split[1],
        "png": png.name,
        "items": items,
    }
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(record, indent=2) + "\n")
    return png, js


def explain_arrays(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    task: str,
    label_names: Sequence[str],
    decision: Decision,
    out_dir: Path,
    stem: str = "explain",
    n: int = 16,
    seed: int = 0,
    device: torch.device,
    title: str = "",
    meta: Mapping[str, Any] | None = None,
) -> ExplainResult:
    """Predict a split, pick right and wrong cases, write ``<stem>.png`` and ``<stem>.json``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier ``(B, C, H, W) -> (B, K)`` logits (not modified).
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` in ``[0, 1]``, as :func:`common.evaluation.predict_proba`
        takes them (may be memory-mapped).
    labels : numpy.ndarray
        int ``(N,)`` true classes.
    task : str
        The checkpoint's task (see :func:`choose_method`).
    label_names : Sequence[str]
        Name of each class index (may be empty: ``class k``).
    decision : Decision
        Threshold rule (:func:`decision_threshold`).
    out_dir : pathlib.Path
        Created if needed.
    stem : str
        File name stem.
    n : int
        Images in the figure (at most ``N``).
    seed : int
        Seed of the case selection (:func:`select_cases`).
    device : torch.device
        Where to run the model.
    title : str
        First line of the figure title (e.g. model, round and data).
    meta : Mapping[str, Any] or None
        Extra keys for the JSON (e.g. checkpoint and data paths).

    Returns
    -------
    ExplainResult

    Raises
    ------
    ConfigError
        Unsupported model or task (:func:`choose_method`), or ``n < 1``.
    DataError
        If images and labels disagree in length, or the split is empty.

    """
    from common.evaluation import predict_proba

    labels = _checked_labels(images, labels)
    method, layer = choose_method(model, task=task, input_shape=images.shape[1:])
    probs = predict_proba(model, images, device=device)
    pred = decision.predict(probs)
    correct = pred == labels
    picked = select_cases(correct, n=n, seed=seed)
    n_right, n_shown = int(correct.sum()), int(correct[picked].sum())
    at = f" at {layer}" if layer else ""
    log.info(
        "explain: %d of %d images right; showing %d right, %d wrong (%s%s)",
        *(n_right, labels.size, n_shown, picked.size - n_shown, method, at),
    )
    shown = np.asarray(images[picked], dtype=np.float32)
    maps = saliency_maps(
        model, shown, pred[picked], method=method, target_layer=layer, device=device
    )
    items, titles, colors = _describe_cases(picked, pred, labels, probs, correct, label_names)
    png, js = _write_outputs(
        shown,
        maps,
        titles,
        colors,
        out_dir=Path(out_dir),
        stem=stem,
        title=title,
        method=method,
        layer=layer,
        decision=decision,
        label_names=label_names,
        meta=meta,
        seed=seed,
        split=(int(labels.size), int(correct.sum())),
        items=items,
    )
    return ExplainResult(
        png, js, method, layer, decision, picked, correct[picked], tuple(label_names)
    )
