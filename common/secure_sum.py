"""Small count vectors the coordinator may learn only as a sum over sites.

A train reply may carry, besides the model update, one ``ArrayRecord`` named
:data:`RECORD` of counts whose per-site values are the site's business but whose sum the
run needs: the per-class validation score histogram of the received global model
(:mod:`common.operating_point`) and, with ``class-weighting = "federation"``, the site's
training label counts (:mod:`common.imbalance`). Which arrays, and their shapes, follow
from the run config alone (:func:`spec`), so both sides agree on the layout without a
message.

The label counts are summed once before round 1 by a **census**: a ``train`` message
whose config holds :data:`CENSUS_KEY` = true, which a site answers without training (the
global model unchanged, ``num-examples`` and the record), through SecAgg+ when it is on.
The coordinator then sends the federation's counts to every training round as the config
list :data:`FEDERATION_COUNTS_KEY`.

Under SecAgg+ the sites validate each global model inside the next ``train`` message, so
the last round's model has no train message after it; its validation is a **validate-only**
``train`` message (config :data:`VALIDATE_KEY` = true, sent by ``server/secagg.py`` in place
of the final ``evaluate`` exchange), which a site answers like the census, without
training, with its ``val-*`` metrics and the score histogram inside the masked sum.

* **SecAgg+ off**: the record travels in the plain train reply and the coordinator adds
  the sites' records (``server/runlog.py``).
* **SecAgg+ on**: the site appends ``counts / (w * SCALE)`` to its masked delta, with
  ``w`` its ``num-examples``; the protocol reveals only the weighted mean
  ``sum_i w_i x_i / W``, from which the coordinator recovers ``sum_i counts_i`` =
  ``mean * W * SCALE`` (:func:`to_masked`, :func:`from_mean`). The scale keeps every
  entry of a reasonable site inside ``secagg.clip-range`` (a site whose counts would
  exceed it fails the round loudly, as an oversized delta does: at the default clip
  range 4 that takes a bin count above 1024 times the site's training count). The
  recovered sum is exact up to half the quantisation step ``s = c W / 2^30`` times
  ``SCALE`` per site (common/secagg/encoding.py): ``W * 4.8e-7`` counts at the default
  clip range, 0.002 for the demo's 4237 training images, below half an image up to a
  million; :func:`from_mean` rounds to whole counts.

Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray

from common.errors import DataError

if TYPE_CHECKING:
    from common.config import RunConfig

#: Name of the reply record.
RECORD = "medfed.secure-sum"
#: The per-class validation score histogram, ``(2, operating-point-bins)``.
SCORE_HISTOGRAM = "score-histogram"
#: The site's training label counts, ``(num-classes,)`` (``class-weighting = "federation"``).
CLASS_COUNTS = "class-counts"
#: Train-message config key (bool) of the census before round 1.
CENSUS_KEY = "medfed-census"
#: Train-message config key (bool): validate the received model, train nothing.
VALIDATE_KEY = "medfed-validate-only"
#: Train-message config key (list of float): the federation's summed class counts.
FEDERATION_COUNTS_KEY = "federation-class-counts"
#: Divides counts before masking (see the module docstring).
SCALE = 256.0
#: dtype of the record's arrays on the wire.
DTYPE = "float32"

Spec = dict[str, tuple[int, ...]]


def spec(run: RunConfig) -> Spec:
    """``{array name: shape}`` of the secure-sum record the run's train replies carry.

    The score histogram when the run picks an operating point (``operating-point`` not
    ``none``), validates in the train message (``evaluate-in-train``) and trains a binary
    image-level classifier; the class counts with ``class-weighting = "federation"``;
    otherwise empty.
    """
    out: Spec = {}
    if (
        run.operating_point.method != "none"
        and run.evaluation.in_train
        and run.task in ("classification", "tabular")
        and run.num_classes == 2
    ):
        out[SCORE_HISTOGRAM] = (2, run.operating_point.bins)
    if run.class_weight_source() == "federation":
        out[CLASS_COUNTS] = (run.num_classes,)
    return out


def to_record(sums: Mapping[str, NDArray[np.generic]]) -> ArrayRecord:
    """Return the reply record :data:`RECORD` of ``sums`` (one site's counts or their sum).

    Parameters
    ----------
    sums : Mapping[str, numpy.ndarray]
        Array name (:data:`SCORE_HISTOGRAM`, :data:`CLASS_COUNTS`) to counts, any real
        dtype, shapes as in :func:`spec`.

    Returns
    -------
    flwr.app.ArrayRecord
        The same arrays as :data:`DTYPE` (float32: counts up to 2**24 are exact).
    """
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.dtype(DTYPE))) for k, v in sums.items()})


def complete(
    partial: Mapping[str, NDArray[np.generic]], run_spec: Spec
) -> dict[str, NDArray[np.float64]]:
    """Return ``partial`` with every array of ``run_spec`` it lacks filled with zeros.

    A site sends all the run's arrays in every reply that carries the record (the census
    has no validation histogram; a train round repeats the class counts), so the record
    always has the run's exact layout.
    """
    return {
        name: np.asarray(partial[name], np.float64)
        if name in partial
        else np.zeros(shape, np.float64)
        for name, shape in run_spec.items()
    }


def length(run_spec: Spec) -> int:
    """Return the number of entries ``E`` the record adds to the masked vector."""
    return int(sum(int(np.prod(shape)) for shape in run_spec.values()))


def check_counts(arrays: Mapping[str, NDArray[np.generic]], run_spec: Spec) -> None:
    """Raise :class:`DataError` unless ``arrays`` is exactly ``run_spec``'s, counts >= 0."""
    if set(arrays) != set(run_spec):
        raise DataError(f"secure-sum record must hold exactly {sorted(run_spec)}")
    for name, shape in run_spec.items():
        a = np.asarray(arrays[name])
        if a.shape != shape:
            raise DataError(f"secure-sum array {name!r} has shape {a.shape}, expected {shape}")
        if not np.all(np.isfinite(a)) or (a < 0).any():
            raise DataError(f"secure-sum array {name!r} must hold finite counts >= 0")


def to_masked(
    arrays: Mapping[str, NDArray[np.generic]] | None, run_spec: Spec, *, weight: float
) -> NDArray[np.float64]:
    """Return the site's entries for the masked vector: ``counts / (weight * SCALE)``, ``(E,)``.

    ``arrays`` None (the site did not validate this round, e.g. its policy's evaluation
    limit) contributes zeros, so every site's vector has the same length.
    """
    if not run_spec:
        return np.zeros(0, np.float64)
    if arrays is None:
        return np.zeros(length(run_spec), np.float64)
    check_counts(arrays, run_spec)
    flat = np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in run_spec])
    return flat / (float(weight) * SCALE)


def from_mean(
    mean: NDArray[np.float64], run_spec: Spec, *, total_weight: float
) -> dict[str, NDArray[np.float64]]:
    """Recover the sum over sites from the unmasked weighted mean of :func:`to_masked`.

    Parameters
    ----------
    mean : numpy.ndarray
        float64 ``(E,)``: the decoded weighted mean of the extra entries.
    run_spec : Spec
        From :func:`spec`.
    total_weight : float
        ``W``, the survivors' summed ``num-examples``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{name: float64 counts}``, rounded to whole counts and clipped at 0.
    """
    if mean.shape != (length(run_spec),):
        raise DataError(f"secure-sum entries {mean.shape} != ({length(run_spec)},)")
    out: dict[str, NDArray[np.float64]] = {}
    start = 0
    for name, shape in run_spec.items():
        n = int(np.prod(shape))
        part = mean[start : start + n] * float(total_weight) * SCALE
        out[name] = np.clip(np.rint(part), 0.0, None).reshape(shape)
        start += n
    return out
