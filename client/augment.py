"""Training-time image augmentation at the site, batched on the training device.

Run config ``augment`` picks a preset (:data:`PRESETS`); :func:`make_augmentation` builds
a :class:`BatchAugmentation` that the training loop (client/train.py ``train_epochs``,
``augment=``) applies to every batch ``(B, C, H, W)`` before the forward pass, with
independent random parameters per example:

1. a random affine warp -- rotation, isotropic zoom and translation -- resampled
   bilinearly with edge replication by MONAI's batched
   :class:`monai.networks.layers.AffineTransform` (one ``grid_sample`` for the batch);
2. intensity scaling ``x * (1 + f)`` and shifting ``x + o`` (the semantics of MONAI's
   ``RandScaleIntensity`` / ``RandShiftIntensity``);
3. additive Gaussian noise of fixed standard deviation (MONAI ``RandGaussianNoise``);

then clamps to the images' value range, ``[0, 1]`` for site datasets. No flips: a
mirrored chest X-ray puts the heart on the wrong side.

Why batched rather than MONAI's array transforms (``RandAffine`` & co.): those work on one
channel-first image and draw one set of parameters per call, so a batch needs a Python
loop. On CPU that costs about 8 ms per 28 x 28 image, several times the DP-SGD step of
the whole batch; the batched version costs a few milliseconds per batch of 32.

Randomness: every draw comes from the one ``torch.Generator`` passed in. The site
handlers give it the round's secret generator under DP
(``client.privacy.DPRandomness.augmentation``, 64 bits from the OS CSPRNG), the
run-config-derived one only without DP or under the simulation-only
``dp.reproducible-noise`` (client/site/handlers.py). DP-SGD's guarantee does not rest on
the augmentation being secret (every augmented example's gradient is still clipped on its
own); keeping it secret means nothing drawn at a site is predictable by the coordinator.

Augmentation multiplicity (De et al., "Unlocking high-accuracy differentially private
image classification through scale", 2022: K views per example, their gradients averaged
before clipping) is not implemented: it multiplies the cost of every DP step by K.

MONAI is imported only when a :class:`BatchAugmentation` is built (it takes about a second
to import; ``augment = "none"`` never pays it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from common.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """Ranges of one augmentation preset; each parameter is drawn uniformly per example.

    Attributes
    ----------
    rotate_degrees : float
        Rotation angle in ``[-r, r]`` degrees, about the image centre.
    zoom : float
        Isotropic zoom factor in ``[1 - z, 1 + z]``.
    translate : float
        Shift along each axis in ``[-t, t]`` times the image's width / height.
    intensity_scale : float
        Factor ``f`` in ``[-a, a]``: ``x * (1 + f)``.
    intensity_shift : float
        Offset ``o`` in ``[-b, b]`` (image units, ``[0, 1]`` scale): ``x + o``.
    noise_std : float
        Standard deviation of additive Gaussian noise (image units); 0 = none.

    """

    rotate_degrees: float
    zoom: float
    translate: float
    intensity_scale: float
    intensity_shift: float
    noise_std: float


#: Run config ``augment`` presets (``"none"`` builds nothing), for small grey-scale
#: images such as MedMNIST's 28 x 28 chest X-rays.
PRESETS: dict[str, AugmentSpec] = {
    "light": AugmentSpec(
        rotate_degrees=10.0,
        zoom=0.1,
        translate=0.05,
        intensity_scale=0.1,
        intensity_shift=0.05,
        noise_std=0.02,
    ),
    "medium": AugmentSpec(
        rotate_degrees=15.0,
        zoom=0.15,
        translate=0.1,
        intensity_scale=0.2,
        intensity_shift=0.1,
        noise_std=0.05,
    ),
}


class BatchAugmentation:
    """Random per-example augmentation of an image batch (see the module docstring).

    Parameters
    ----------
    spec : AugmentSpec
        Parameter ranges.
    generator : torch.Generator
        Source of every random draw, on the device the batches will be on.
    value_range : tuple of float
        ``(low, high)`` the output is clamped to; site images are in ``[0, 1]``.

    """

    def __init__(
        self,
        spec: AugmentSpec,
        *,
        generator: torch.Generator,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        from monai.networks.layers.spatial_transforms import AffineTransform  # lazy: slow import

        self.spec = spec
        self.generator = generator
        self.value_range = value_range
        # theta in torch's normalised (x, y) coordinates, pulled from output to input.
        self._warp = AffineTransform(
            normalized=True,
            reverse_indexing=False,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )

    def set_random_state(self, seed: int) -> BatchAugmentation:
        """Reseed the generator (MONAI ``Randomizable.set_random_state``'s role); return self."""
        self.generator.manual_seed(seed)
        return self

    def _uniform(self, half_width: float, *shape: int) -> torch.Tensor:
        """Draw float32 ``shape`` uniform in ``[-half_width, half_width]`` on the generator."""
        u = torch.rand(
            shape, generator=self.generator, device=self.generator.device, dtype=torch.float32
        )
        return (2.0 * u - 1.0) * half_width

    def affine_matrices(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Draw ``batch`` random affine matrices for ``torch.nn.functional.affine_grid``.

        Returns
        -------
        torch.Tensor
            float32 ``(B, 2, 3)`` on the generator's device, mapping normalised output
            coordinates ``(x, y)`` in ``[-1, 1]`` to input coordinates: rotation by
            ``a`` and zoom ``s`` in pixel space (so non-square images are not sheared),
            ``A = diag(1/W, 1/H) R(a) diag(W, H) / s``, and translation ``2 t`` (a shift
            of ``t`` image widths / heights).

        """
        s = self.spec
        angle = self._uniform(math.radians(s.rotate_degrees), batch)
        zoom = 1.0 + self._uniform(s.zoom, batch)
        shift = 2.0 * self._uniform(s.translate, batch, 2)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        aspect = height / width
        row_x = torch.stack([cos, -sin * aspect, shift[:, 0]], dim=1)
        row_y = torch.stack([sin / aspect, cos, shift[:, 1]], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Return an augmented copy of ``images``.

        Parameters
        ----------
        images : torch.Tensor
            float ``(B, C, H, W)`` on any device; ``B`` may be 0 (an empty Poisson batch,
            returned unchanged).

        Returns
        -------
        torch.Tensor
            Same shape, dtype and device, values clamped to :attr:`value_range`.

        Raises
        ------
        DataError
            If ``images`` is not a 4-D floating-point tensor.

        """
        if images.ndim != 4 or not images.is_floating_point():
            raise DataError(
                f"augmentation needs float images (B, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}; set augment='none' for this dataset."
            )
        batch, _, height, width = images.shape
        if batch == 0:
            return images
        s = self.spec
        theta = self.affine_matrices(batch, height, width).to(images.device)
        out = self._warp(images.float(), theta)
        gain = 1.0 + self._uniform(s.intensity_scale, batch, 1, 1, 1).to(images.device)
        offset = self._uniform(s.intensity_shift, batch, 1, 1, 1).to(images.device)
        out = out * gain + offset
        if s.noise_std > 0:
            noise = torch.randn(
                tuple(out.shape),
                generator=self.generator,
                device=self.generator.device,
                dtype=torch.float32,
            )
            out = out + s.noise_std * noise.to(images.device)
        low, high = self.value_range
        result: torch.Tensor = out.clamp_(low, high).to(images.dtype)
        return result


def make_augmentation(name: str, *, generator: torch.Generator) -> BatchAugmentation | None:
    """Build the run config's ``augment`` preset, or None for ``"none"``.

    Parameters
    ----------
    name : str
        ``"none"`` or a key of :data:`PRESETS`.
    generator : torch.Generator
        The round's augmentation generator (the site's secret one under DP).

    Raises
    ------
    ConfigError
        Unknown preset, with the valid names and the closest match.

    """
    if name == "none":
        return None
    if name not in PRESETS:
        raise ConfigError(
            f"unknown augment preset {name!r}.{did_you_mean(name, PRESETS)} "
            f"Valid: {['none', *sorted(PRESETS)]}."
        )
    log.info("augmenting training batches with preset %r: %s", name, PRESETS[name])
    return BatchAugmentation(PRESETS[name], generator=generator)
