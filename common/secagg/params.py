"""Secure-aggregation record names, stage names and arithmetic shared by both sides.

The settings themselves (``secagg.*`` keys: neighbours, threshold, clip range,
quantisation) and what they imply (the reconstruction threshold
:meth:`~common.config.SecAggConfig.shares_needed`, the secure-sum layout ``sum_spec``)
are the run config's group :class:`common.config.SecAggConfig` (``run.secagg``).

The protocol is SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, section 3, Algorithm 2), which
generalises SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, section 4, Figure 4) from the complete graph to a k-regular
communication graph.
"""

from __future__ import annotations

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

#: Bits of the modular arithmetic: masked vectors are packed as ``uint32`` (mod 2^32).
MODULUS_BITS = 32
#: The encoded sum of all sites stays inside ``[-2^HEADROOM_BITS, 2^HEADROOM_BITS]``,
#: one bit below the signed 32-bit range, so rounding of up to 2^30 sites cannot wrap.
HEADROOM_BITS = 30
