"""Model commands: ``medfed explain`` (saliency figure) and ``medfed export`` (TorchScript/ONNX).

Both read a medfed checkpoint (``final_model.pt``, ``best_model.pt`` or
``checkpoints/round-NNN.pt``); data comes from a MedMNIST ``.npz`` file or a site dataset
directory, as for ``medfed evaluate``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import fail
from common.errors import ConfigError, MedfedError

log = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)


def explain(
    checkpoint: Annotated[Path, typer.Option(help="A medfed checkpoint (final_model.pt).")],
    data: Annotated[
        Path, typer.Option(help="A MedMNIST-format .npz file, or a site dataset directory.")
    ],
    out: Annotated[Path, typer.Option(help="Output directory (created if needed).")],
    split: Annotated[str, typer.Option(help="Split: train, val or test.")] = "val",
    n: Annotated[int, typer.Option("--n", help="Images in the grid: half right, half wrong.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the case selection.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, auto, cuda or cuda:N.")] = "cpu",
) -> None:
    """Draw a PNG grid of images with Grad-CAM or occlusion-sensitivity overlays.

    Predicts the whole split, picks n images (n/2 predicted wrong and the rest right
    when the split has them; seeded), and overlays where the model looked for its
    predicted class: Grad-CAM at the last convolution (cnn) or occlusion sensitivity
    (gru, lstm). Each tile's title gives the true label, the predicted class and its
    probability; the figure title gives the decision threshold (the checkpoint's, else
    0.5). Writes OUT/explain-SPLIT.png and OUT/explain-SPLIT.json (indices, true and
    predicted classes, probabilities).

    Example: medfed explain --checkpoint runs/latest/final_model.pt
    --data runs/latest/sites/global-val --split val --out runs/latest/explain
    """
    from common.checkpoint import load_checkpoint
    from common.device import resolve_device
    from simulation.research.model_tools import explain_checkpoint, load_split

    try:
        ckpt = load_checkpoint(checkpoint)
        result = explain_checkpoint(
            ckpt,
            load_split(ckpt, data, split),
            out,
            n=n,
            seed=seed,
            stem=f"explain-{split}",
            device=resolve_device(device),
            meta={"checkpoint": str(checkpoint)},
        )
    except MedfedError as exc:
        raise fail(exc) from None
    right = int(result.correct.sum())
    how = f"Grad-CAM at {result.target_layer}" if result.target_layer else "occlusion sensitivity"
    console.print(
        f"{how}: {right} right + {result.correct.size - right} wrong predictions "
        f"({result.decision.describe(result.label_names)})"
    )
    console.print(f"figure: [bold]{result.png}[/]\ncases:  {result.json}")


def export(
    checkpoint: Annotated[Path, typer.Option(help="A medfed checkpoint (final_model.pt).")],
    out: Annotated[Path, typer.Option(help="Output directory (created if needed).")],
    onnx: Annotated[
        bool, typer.Option("--onnx/--no-onnx", help="Also write model.onnx (medfed[export]).")
    ] = False,
    onnx_input: Annotated[
        str | None,
        typer.Option(
            help="ONNX input dtype: uint8 (images as stored, scaled by 1/255 inside) or "
            "float32 ((N, C, H, W) in [0, 1]); implies --onnx. Default: uint8 for image "
            "models."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Also check on real images: a .npz file or a site dataset dir."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --data for the check.")] = "val",
    check_images: Annotated[int, typer.Option(help="Images per check batch.")] = 32,
    tolerance: Annotated[
        float, typer.Option(help="Largest accepted max |p_exported - p_pytorch|.")
    ] = 1e-5,
) -> None:
    """Export a checkpoint as TorchScript (and ONNX) with a model card.

    OUT/model.ts: TorchScript of preprocessing + model + softmax. Input: uint8 images
    as stored ((N, H, W) grey, (N, H, W, C) colour; divided by 255 inside) or float
    (N, C, H, W) in [0, 1] as in a site dataset; output: float32 class probabilities.
    OUT/model.onnx with --onnx. OUT/model_card.json (also inside model.ts): task,
    labels, input shape and range, threshold, rounds, sites with their example counts,
    epsilon and delta (from the run directory beside the checkpoint), validation
    metrics, library versions, config hash, and the numerical check: raw images
    through the export vs preprocessed images through the PyTorch model; fails above
    --tolerance. `medfed evaluate --checkpoint OUT/model.ts` scores the export.

    Example: medfed export --checkpoint runs/latest/final_model.pt --out runs/latest/export
    --onnx
    """
    from common.checkpoint import load_checkpoint
    from common.export import IMAGE_TASKS, export_model
    from simulation.research.model_tools import check_batches, load_split, model_card

    try:
        if check_images < 1:
            raise ConfigError(f"--check-images={check_images} must be >= 1")
        ckpt = load_checkpoint(checkpoint)
        onnx = onnx or onnx_input is not None  # --onnx-input implies --onnx
        if onnx and onnx_input is None:
            onnx_input = "uint8" if ckpt.task in IMAGE_TASKS else "float32"
        real = load_split(ckpt, data, split) if data is not None else None
        result = export_model(
            ckpt,
            out,
            checks=check_batches(ckpt, real, n=check_images),
            card=model_card(ckpt, checkpoint, real),
            onnx_input=onnx_input if onnx else None,
            tolerance=tolerance,
        )
    except MedfedError as exc:
        raise fail(exc) from None
    for name, diff in result.diffs.items():
        shown = "not measured" if diff is None else f"{diff:.3g}"
        console.print(f"max |p_exported - p_pytorch| {name}: {shown} (tolerance {tolerance:g})")
    for note in result.card["equivalence"]["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    if result.card.get("sites-note"):
        console.print(f"[yellow]model card:[/] {result.card['sites-note']}")
    console.print(f"TorchScript: [bold]{result.torchscript}[/]")
    if result.onnx is not None:
        console.print(f"ONNX ({onnx_input} input): [bold]{result.onnx}[/]")
    console.print(f"model card: {result.card_path}")


def register(app: typer.Typer) -> None:
    """Add ``explain`` and ``export`` to the root ``medfed`` app."""
    app.command()(explain)
    app.command()(export)
