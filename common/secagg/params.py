"""Secure-aggregation parameters, record names and stage names shared by both sides.

The protocol is SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 3, Algorithm 2), which
generalises SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, section 4, Figure 4) from the complete graph to a k-regular
communication graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    from common.config import RunConfig

#: Name of the ``ConfigRecord`` that carries protocol fields in both directions.
RECORD = "secagg"
#: Name of the ``ArrayRecord`` holding the masked 32-bit vector in a site's reply.
MASKED_RECORD = "masked"
#: Key of the single array inside :data:`MASKED_RECORD`.
MASKED_ARRAY = "vector"
#: Metric key that carries a site's FedAvg weight (Flower's ``weighted_by_key``).
WEIGHT_KEY = "num-examples"
#: Domain-separation label prefixed to every HKDF ``info`` and every AEAD associated data.
PROTOCOL_LABEL = b"medfed-secagg-v1"

# Stage names, in protocol order (Bell et al. 2020, Algorithm 2, rounds 0-3).
ADVERTISE = "advertise-keys"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK)

QUANTISATIONS = ("deterministic", "stochastic")

#: Bits of the modular arithmetic: masked vectors are packed as ``uint32`` (mod 2^32).
MODULUS_BITS = 32
#: The encoded sum of all sites stays inside ``[-2^HEADROOM_BITS, 2^HEADROOM_BITS]``,
#: one bit below the signed 32-bit range, so rounding of up to 2^30 sites cannot wrap.
HEADROOM_BITS = 30


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """Validated secure-aggregation settings (run config group ``secagg.``).

    Parameters
    ----------
    neighbours : int
        ``secagg.neighbours``: size ``k`` of each site's neighbourhood in the k-regular
        communication graph (Bell et al. 2020, section 3.1). ``0`` means every other
        sampled site (the complete graph of Bonawitz et al. 2017). A ``k`` smaller than
        ``n - 1`` is rounded up to even (Harary-style ring graph).
    threshold : float
        ``secagg.threshold``: fraction in ``[0.5, 1)``. A secret shared among ``m``
        holders (the ``k`` neighbours and the site itself) needs
        ``t = floor(threshold * m) + 1`` shares to be rebuilt, a strict majority at 0.5,
        so ``m - t`` holders may drop after sending their masked input.
    clip_range : float
        ``secagg.clip-range``: bound ``c`` on ``|delta|`` per coordinate, where ``delta``
        is the site's trained float weights minus the received global weights. A site
        whose delta leaves ``[-c, c]`` refuses to send (:class:`ClipRangeError`); nothing
        is clipped silently.
    quantisation : str
        ``secagg.quantisation``: ``"deterministic"`` (round to nearest) or
        ``"stochastic"`` (unbiased randomized rounding).
    sum_spec : dict[str, tuple[int, ...]]
        The run's secure-sum arrays (:func:`common.secure_sum.spec`, e.g. the validation
        score histogram), appended to every site's masked delta so that only their sum
        over the survivors is revealed; empty for none.

    Raises
    ------
    ConfigError
        Naming the offending ``secagg.*`` key, the rule and the fix.

    """

    neighbours: int = 0
    threshold: float = 0.5
    clip_range: float = 4.0
    quantisation: str = "deterministic"
    sum_spec: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.neighbours < 0:
            raise ConfigError(
                f"config key 'secagg.neighbours'={self.neighbours} must be >= 0 "
                "(0 = every other site)."
            )
        if not 0.5 <= self.threshold < 1.0:
            raise ConfigError(
                f"config key 'secagg.threshold'={self.threshold} must be in [0.5, 1): a "
                "majority of a neighbourhood must be needed to rebuild a secret."
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError(
                f"config key 'secagg.clip-range'={self.clip_range} must be a finite "
                "number > 0 (the largest |weight change| a site may send)."
            )
        if self.quantisation not in QUANTISATIONS:
            raise ConfigError(
                f"config key 'secagg.quantisation'={self.quantisation!r} must be one of "
                f"{list(QUANTISATIONS)}."
            )

    @classmethod
    def from_run(cls, run: RunConfig) -> SecAggParams:
        """Build from the parsed run config's ``secagg.*`` keys (and its secure sums)."""
        from common import secure_sum

        return cls(
            neighbours=run.secagg_neighbours,
            threshold=run.secagg_threshold,
            clip_range=run.secagg_clip_range,
            quantisation=run.secagg_quantisation,
            sum_spec=secure_sum.spec(run),
        )

    def shares_needed(self, holders: int) -> int:
        """Reconstruction threshold ``t`` for a secret with ``holders`` share holders.

        ``t = floor(threshold * holders) + 1`` (capped at ``holders``), at least 2 so no
        single holder ever learns a secret.

        Raises
        ------
        SecAggAbortedError
            If ``holders < 2``: one site alone cannot hide its update.

        """
        from common.secagg.errors import SecAggAbortedError

        if holders < 2:
            raise SecAggAbortedError(
                f"secure aggregation needs at least 2 sites per neighbourhood, got {holders}"
            )
        return max(2, min(holders, math.floor(self.threshold * holders) + 1))
