"""Fixed-point encoding of a site's weighted model delta into ``Z_{2^32}``.

What is masked
--------------
The *delta* ``d = w_trained - w_global`` of every floating-point array of the model
state (parameters and float buffers), concatenated in the order of the global
``ArrayRecord`` (float64 on the way, so no precision is lost before quantisation).
Non-float arrays (integer buffers such as BatchNorm's ``num_batches_tracked``) are not
masked: a site refuses to send if it changed one, and the server keeps the global value.
Masking deltas instead of weights means no weight is clipped: only the change in one
round must lie in ``[-c, c]`` (``secagg.clip-range``), and a site whose delta does not
fails loudly (:class:`ClipRangeError`).

Encoding (section "Fixed-point" of the README)
----------------------------------------------
Let ``W_adv`` be the sum of the weights (``num-examples``) of the sites that advertised
keys this round, ``c`` the clip range and ``s = c * W_adv / 2^30`` the quantisation step.
Site ``i`` with weight ``w_i`` encodes ``q_i = Q(w_i * d_i / s)`` (``Q`` = round to nearest,
or unbiased stochastic rounding) and reduces it mod 2^32. The sum over any subset of the
advertised sites satisfies ``|sum q_i| <= 2^30 + n < 2^31``, so it decodes exactly as a
signed 32-bit integer. The server divides by ``W`` (the survivors' total weight)::

    mean_hat = s * sum_i q_i / W

Error bound (per coordinate, ``n`` surviving sites)::

    deterministic: |mean_hat - sum_i w_i d_i / W| <= n * s / (2 W) = n c W_adv / (2^31 W)
    stochastic:    |mean_hat - sum_i w_i d_i / W| <  n * s / W,     and E[mean_hat] exact

With no dropout ``W = W_adv``, so the bound is ``n c / 2^31`` (e.g. 3 sites, ``c = 4``:
5.6e-9), below float32 resolution of typical weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from common.secagg.errors import ClipRangeError, SecAggProtocolError
from common.secagg.params import HEADROOM_BITS

FloatState = Mapping[str, NDArray[np.generic]]


@dataclass(frozen=True)
class Layout:
    """Which arrays of a model state are masked, and where they sit in the flat vector.

    Attributes
    ----------
    keys : tuple[str, ...]
        All state keys, in record order.
    shapes : tuple[tuple[int, ...], ...]
        Their shapes.
    dtypes : tuple[str, ...]
        Their NumPy dtype names.

    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, state: FloatState) -> Layout:
        """Layout of a state mapping ``{key: ndarray}`` (e.g. a global ``ArrayRecord``)."""
        keys = tuple(state)
        return cls(
            keys=keys,
            shapes=tuple(tuple(int(d) for d in np.shape(state[k])) for k in keys),
            dtypes=tuple(np.asarray(state[k]).dtype.name for k in keys),
        )

    @property
    def masked_keys(self) -> tuple[str, ...]:
        """Keys of floating-point arrays (the ones whose delta is masked)."""
        return tuple(
            k for k, dt in zip(self.keys, self.dtypes, strict=True) if np.dtype(dt).kind == "f"
        )

    @property
    def length(self) -> int:
        """Number of masked coordinates ``L`` (the masked vector's length)."""
        return sum(
            int(np.prod(shape, dtype=np.int64))
            for shape, dt in zip(self.shapes, self.dtypes, strict=True)
            if np.dtype(dt).kind == "f"
        )


def flat_delta(
    *, trained: FloatState, global_state: FloatState, layout: Layout
) -> NDArray[np.float64]:
    """Return ``trained - global`` of the masked arrays as one float64 vector ``(L,)``.

    Raises
    ------
    SecAggProtocolError
        If keys/shapes differ from ``layout``, or a non-float array changed in training
        (it cannot be averaged securely and is never silently overwritten).

    """
    if tuple(trained) != layout.keys or tuple(global_state) != layout.keys:
        raise SecAggProtocolError(
            "trained and global arrays must have the keys of the global model, in order"
        )
    parts: list[NDArray[np.float64]] = []
    for key, shape, dt in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        new, old = np.asarray(trained[key]), np.asarray(global_state[key])
        if new.shape != shape or old.shape != shape:
            raise SecAggProtocolError(f"array {key!r} has shape {new.shape}, expected {shape}")
        if np.dtype(dt).kind != "f":
            if not np.array_equal(new, old):
                raise SecAggProtocolError(
                    f"non-float array {key!r} ({dt}) changed during local training; secure "
                    "aggregation averages float arrays only. Freeze it or make it float."
                )
            continue
        parts.append(np.subtract(new, old, dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def check_clip_range(delta: NDArray[np.float64], *, clip_range: float) -> None:
    """Fail loudly if any ``|delta|`` exceeds ``clip_range`` (nothing is clipped silently).

    Raises
    ------
    ClipRangeError
        Naming the largest ``|delta|`` and the config key to raise.

    """
    if delta.size == 0:
        return
    worst = float(np.maximum(delta.max(), -delta.min()))  # NaN propagates
    if not np.isfinite(worst) or worst > clip_range:
        raise ClipRangeError(
            f"this round's model change reaches |delta| = {worst:.4g}, beyond "
            f"'secagg.clip-range' = {clip_range:g}; raise secagg.clip-range (costs "
            "precision: see the error bound) or lower the learning rate."
        )


def quantisation_step(*, clip_range: float, total_weight: float) -> float:
    """Step ``s = c * W_adv / 2^30`` shared by all sites of a round (units of weight*delta).

    Raises
    ------
    SecAggProtocolError
        If ``total_weight`` is not a finite number > 0.

    """
    if not (np.isfinite(total_weight) and total_weight > 0):
        raise SecAggProtocolError(f"total weight must be finite and > 0, got {total_weight!r}")
    return float(clip_range) * float(total_weight) / float(2**HEADROOM_BITS)


def encode(
    delta: NDArray[np.float64],
    *,
    weight: float,
    step: float,
    stochastic: bool,
    rng: np.random.Generator | None = None,
) -> NDArray[np.uint32]:
    """Quantise ``weight * delta / step`` to integers and reduce them mod 2^32.

    Parameters
    ----------
    delta : ndarray, shape (L,), float64
        Already checked against the clip range.
    weight : float
        This site's ``num-examples`` (> 0).
    step : float
        :func:`quantisation_step`.
    stochastic : bool
        Unbiased randomized rounding (``floor(x + U[0, 1))``) instead of nearest.
    rng : numpy.random.Generator, optional
        Source of the rounding noise (required when ``stochastic``).

    Returns
    -------
    ndarray, shape (L,), uint32

    """
    scaled = delta * (float(weight) / step)
    if stochastic:
        if rng is None:
            raise ValueError("stochastic quantisation needs an explicit rng")
        scaled += rng.random(scaled.shape, dtype=np.float64)
        np.floor(scaled, out=scaled)
    else:
        np.rint(scaled, out=scaled)
    return scaled.astype(np.int64).astype(np.uint32)


def decode_mean(
    total: NDArray[np.uint32], *, step: float, total_weight: float
) -> NDArray[np.float64]:
    """Turn the unmasked sum ``sum_i q_i mod 2^32`` into the weighted mean delta.

    Returns
    -------
    ndarray, shape (L,), float64
        ``s * int32(total) / W`` (two's complement reading of the modular sum).

    """
    return total.view(np.int32).astype(np.float64) * (step / float(total_weight))


def mean_error_bound(
    *, sites: int, step: float, total_weight: float, stochastic: bool = False
) -> float:
    """Largest per-coordinate error of :func:`decode_mean` against the exact weighted mean.

    Parameters
    ----------
    sites : int
        Number of sites whose input is in the sum (``n``).
    step : float
        The round's :func:`quantisation_step` (``s``, set by the *advertised* weight).
    total_weight : float
        The weight of the sites in the sum (``W``).
    stochastic : bool
        Stochastic instead of round-to-nearest quantisation.

    Returns
    -------
    float
        ``n * s / (2 W)`` (deterministic) or ``n * s / W`` (stochastic), from the module
        docstring's error bound; units of the model's weights.

    """
    per_site = step if stochastic else step / 2.0
    return float(sites) * per_site / float(total_weight)


def apply_mean_delta(
    global_state: FloatState, mean_delta: NDArray[np.float64], *, layout: Layout
) -> dict[str, NDArray[np.generic]]:
    """Return the new global state: float arrays plus ``mean_delta``, others unchanged.

    Float arrays are updated in float64 and cast back to their own dtype.
    """
    out: dict[str, NDArray[np.generic]] = {}
    offset = 0
    for key, shape, dt in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        old = np.asarray(global_state[key])
        if np.dtype(dt).kind != "f":
            out[key] = old.copy()
            continue
        n = int(np.prod(shape, dtype=np.int64))
        upd = old.astype(np.float64) + mean_delta[offset : offset + n].reshape(shape)
        out[key] = upd.astype(old.dtype)
        offset += n
    return out
