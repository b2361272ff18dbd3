"""Message schemas of the four protocol stages, with strict parsing.

Every stage travels as a Flower ``train`` message whose content holds a ``ConfigRecord``
named :data:`~common.secagg.params.RECORD`; the masked vector travels as the only
``ArrayRecord`` of a site's masked-input reply. Parsing checks every field's presence,
type and length and raises :class:`SecAggProtocolError`, so a malformed message excludes
its sender instead of being trusted.

Stage payloads (Bell et al. 2020, Algorithm 2; Bonawitz et al. 2017, Figure 4)::

    server -> site                                 site -> server
    advertise-keys: session, round (+ model, cfg)  enc-pk, mask-pk, seed-commit (+ metrics)
    share-keys:     neighbours' ids/pks, t, W_adv  dst ids, encrypted shares
    masked-input:   src ids, encrypted shares      active neighbours, masked uint32 vector
    unmask:         survivors, dropped             seed shares (survivors), key shares
                                                   (dropped)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from numpy.typing import NDArray

from common.errors import DataError
from common.secagg.crypto import CIPHERTEXT_BYTES, KEY_BYTES, SHARE_BYTES
from common.secagg.errors import SecAggProtocolError
from common.secagg.params import (
    ADVERTISE,
    MASKED_ARRAY,
    MASKED_INPUT,
    MASKED_RECORD,
    RECORD,
    SHARE_KEYS,
    STAGES,
    UNMASK,
)
from common.wire import decode_array

if TYPE_CHECKING:
    from common.config import RunConfig

T = TypeVar("T")
SESSION_BYTES = 16


def _field(rec: ConfigRecord, key: str, typ: type[T]) -> T:
    if key not in rec:
        raise SecAggProtocolError(f"secagg field {key!r} is missing")
    value = rec[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SecAggProtocolError(f"secagg field {key!r} must be {typ.__name__}")
    return value


def _list(rec: ConfigRecord, key: str, typ: type[T], *, nbytes: int | None = None) -> list[T]:
    value = _field(rec, key, list)
    if not all(isinstance(v, typ) and not isinstance(v, bool) for v in value):
        raise SecAggProtocolError(f"secagg field {key!r} must be a list of {typ.__name__}")
    if nbytes is not None and any(len(v) != nbytes for v in value):
        raise SecAggProtocolError(f"secagg field {key!r} holds values not {nbytes} bytes long")
    return value


def _ids(rec: ConfigRecord, key: str) -> list[int]:
    ids = _list(rec, key, int)
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise SecAggProtocolError(f"secagg field {key!r} must hold distinct node ids")
    return ids


def _bytes(rec: ConfigRecord, key: str, n: int) -> bytes:
    value = _field(rec, key, bytes)
    if len(value) != n:
        raise SecAggProtocolError(f"secagg field {key!r} must be {n} bytes")
    return value


def stage_of(content: RecordDict) -> str | None:
    """Return the stage named by a message's secagg record, or ``None`` if it has none.

    Raises
    ------
    SecAggProtocolError
        If the record exists but names no known stage.

    """
    if RECORD not in content.config_records:
        return None
    stage = _field(content.config_records[RECORD], "stage", str)
    if stage not in STAGES:
        raise SecAggProtocolError(f"unknown secagg stage {stage!r}; expected one of {STAGES}")
    return stage


def _wire_fields(message: Any) -> dict[str, Any]:
    """Return a message dataclass's fields under their wire names (``enc_pk``: ``enc-pk``)."""
    return {f.name.replace("_", "-"): getattr(message, f.name) for f in fields(message)}


@dataclass(frozen=True)
class Header:
    """Fields every server request carries: the stage, the round and its session nonce."""

    stage: str
    server_round: int
    session: bytes

    def record(self, **fields: Any) -> ConfigRecord:
        """Build the ``ConfigRecord`` with this header and ``fields``."""
        return ConfigRecord(
            {"stage": self.stage, "round": self.server_round, "session": self.session, **fields}
        )

    @classmethod
    def parse(cls, rec: ConfigRecord) -> Header:
        """Parse a request header."""
        return cls(
            stage=_field(rec, "stage", str),
            server_round=_field(rec, "round", int),
            session=_bytes(rec, "session", SESSION_BYTES),
        )


# ---------------------------------------------------------------- advertise-keys
@dataclass(frozen=True)
class AdvertiseReply:
    """A site's public keys and its commitment to its self-mask seed."""

    enc_pk: bytes
    mask_pk: bytes
    seed_commit: bytes

    def record(self) -> ConfigRecord:
        """Serialise."""
        return ConfigRecord({"stage": ADVERTISE, **_wire_fields(self)})

    @classmethod
    def parse(cls, rec: ConfigRecord) -> AdvertiseReply:
        """Parse and check lengths."""
        _expect_stage(rec, ADVERTISE)
        out = cls(
            enc_pk=_bytes(rec, "enc-pk", KEY_BYTES),
            mask_pk=_bytes(rec, "mask-pk", KEY_BYTES),
            seed_commit=_bytes(rec, "seed-commit", 32),
        )
        if out.enc_pk == out.mask_pk:
            raise SecAggProtocolError("a site must advertise two different public keys")
        return out


# -------------------------------------------------------------------- share-keys
@dataclass(frozen=True)
class ShareKeysRequest:
    """The neighbourhood of one site: ids (sorted, including itself) and their keys."""

    nodes: list[int]
    enc_pks: list[bytes]
    mask_pks: list[bytes]
    threshold: int
    total_weight: float

    def fields(self) -> dict[str, Any]:
        """Fields for :meth:`Header.record`."""
        return _wire_fields(self)

    @classmethod
    def parse(cls, rec: ConfigRecord) -> ShareKeysRequest:
        """Parse and check that lists align."""
        out = cls(
            nodes=_ids(rec, "nodes"),
            enc_pks=_list(rec, "enc-pks", bytes, nbytes=KEY_BYTES),
            mask_pks=_list(rec, "mask-pks", bytes, nbytes=KEY_BYTES),
            threshold=_field(rec, "threshold", int),
            total_weight=float(_field(rec, "total-weight", float)),
        )
        if not len(out.nodes) == len(out.enc_pks) == len(out.mask_pks):
            raise SecAggProtocolError("share-keys lists 'nodes', 'enc-pks', 'mask-pks' differ")
        if out.nodes != sorted(out.nodes):
            raise SecAggProtocolError("share-keys 'nodes' must be sorted")
        return out


@dataclass(frozen=True)
class Ciphertexts:
    """Encrypted share bundles with their peer ids.

    The peers are ``dst`` in a site's reply and ``src`` in the server's request.
    """

    peers: list[int]
    ciphertexts: list[bytes]

    def fields(self, key: str) -> dict[str, Any]:
        """Fields with the peer list under ``key``."""
        return {key: self.peers, "ciphertexts": self.ciphertexts}

    @classmethod
    def parse(cls, rec: ConfigRecord, key: str) -> Ciphertexts:
        """Parse."""
        out = cls(peers=_ids(rec, key), ciphertexts=_list(rec, "ciphertexts", bytes))
        if len(out.peers) != len(out.ciphertexts):
            raise SecAggProtocolError(f"lists {key!r} and 'ciphertexts' differ in length")
        return out


def share_keys_reply(ct: Ciphertexts) -> ConfigRecord:
    """Serialise a site's share-keys reply."""
    return ConfigRecord({"stage": SHARE_KEYS, **ct.fields("dst")})


def parse_share_keys_reply(rec: ConfigRecord) -> Ciphertexts:
    """Parse a site's share-keys reply."""
    _expect_stage(rec, SHARE_KEYS)
    return Ciphertexts.parse(rec, "dst")


# ------------------------------------------------------------------ masked-input
def masked_input_reply(
    vector: NDArray[np.uint32], *, active: list[int], rejected: list[int]
) -> RecordDict:
    """Content of a masked-input reply: the ``uint32`` vector and the peers masked with.

    ``rejected`` names neighbours whose share ciphertext failed authentication (they
    are excluded by the server).
    """
    return RecordDict(
        {
            MASKED_RECORD: ArrayRecord({MASKED_ARRAY: Array(np.ascontiguousarray(vector))}),
            RECORD: ConfigRecord({"stage": MASKED_INPUT, "active": active, "rejected": rejected}),
        }
    )


def parse_masked_input_reply(
    content: RecordDict, *, length: int
) -> tuple[NDArray[np.uint32], list[int], list[int]]:
    """Return ``(vector (L,) uint32, active peers, rejected peers)``.

    Raises
    ------
    SecAggProtocolError
        Wrong records, dtype or length (a site must send nothing but the masked vector).

    """
    rec = content.config_records.get(RECORD)
    if rec is None:
        raise SecAggProtocolError("masked-input reply lacks the secagg record")
    _expect_stage(rec, MASKED_INPUT)
    if list(content.array_records) != [MASKED_RECORD]:
        raise SecAggProtocolError("masked-input reply must carry exactly one ArrayRecord")
    arrays = content.array_records[MASKED_RECORD]
    if list(arrays) != [MASKED_ARRAY]:
        raise SecAggProtocolError("masked-input ArrayRecord must hold exactly one array")
    arr = arrays[MASKED_ARRAY]
    if arr.dtype != "uint32" or tuple(arr.shape) != (length,):
        raise SecAggProtocolError(
            f"masked vector must be uint32 of shape ({length},), got {arr.dtype} {arr.shape}"
        )
    try:
        # the payload's own header is checked before anything is allocated: Array.numpy()
        # would allocate whatever it declares, and raise ValueError/EOFError on junk
        vector = decode_array(arr, shape=(length,), dtype="uint32")
    except DataError as exc:
        raise SecAggProtocolError(f"masked vector: {exc}") from None
    return vector, _ids(rec, "active"), _ids(rec, "rejected")


# ------------------------------------------------------------------------ unmask
@dataclass(frozen=True)
class UnmaskRequest:
    """Which neighbours survived and which dropped.

    A site reveals seed shares of the survivors and mask-key shares of the dropped.
    """

    survivors: list[int]
    dropped: list[int]
    num_survivors: int

    def fields(self) -> dict[str, Any]:
        """Fields for :meth:`Header.record`."""
        return _wire_fields(self)

    @classmethod
    def parse(cls, rec: ConfigRecord) -> UnmaskRequest:
        """Parse; survivors and dropped must be disjoint (never reveal both secrets)."""
        out = cls(
            survivors=_ids(rec, "survivors"),
            dropped=_ids(rec, "dropped"),
            num_survivors=_field(rec, "num-survivors", int),
        )
        if set(out.survivors) & set(out.dropped):
            raise SecAggProtocolError("unmask request names a node as survivor and dropped")
        return out


@dataclass(frozen=True)
class UnmaskReply:
    """Shares a site reveals: of survivors' seeds and of dropped sites' mask keys."""

    seed_nodes: list[int]
    seed_shares: list[bytes]
    key_nodes: list[int]
    key_shares: list[bytes]

    def record(self) -> ConfigRecord:
        """Serialise."""
        return ConfigRecord({"stage": UNMASK, **_wire_fields(self)})

    @classmethod
    def parse(cls, rec: ConfigRecord) -> UnmaskReply:
        """Parse and check lengths."""
        _expect_stage(rec, UNMASK)
        out = cls(
            seed_nodes=_ids(rec, "seed-nodes"),
            seed_shares=_list(rec, "seed-shares", bytes, nbytes=SHARE_BYTES),
            key_nodes=_ids(rec, "key-nodes"),
            key_shares=_list(rec, "key-shares", bytes, nbytes=SHARE_BYTES),
        )
        if len(out.seed_nodes) != len(out.seed_shares) or len(out.key_nodes) != len(out.key_shares):
            raise SecAggProtocolError("unmask reply lists differ in length")
        return out


def _expect_stage(rec: ConfigRecord, stage: str) -> None:
    got = _field(rec, "stage", str)
    if got != stage:
        raise SecAggProtocolError(f"expected a {stage!r} message, got {got!r}")


# ------------------------------------------------------------- egress allow-list
def _is_bytes(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) == n


def _is_bytes_list(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(isinstance(x, bytes) and len(x) == n for x in v)


def _is_id_list(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
    )


#: Exactly the fields a site's ``secagg`` record may carry, per stage, and their check.
REPLY_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    ADVERTISE: {
        "enc-pk": _is_bytes(KEY_BYTES),
        "mask-pk": _is_bytes(KEY_BYTES),
        "seed-commit": _is_bytes(32),
    },
    SHARE_KEYS: {"dst": _is_id_list, "ciphertexts": _is_bytes_list(CIPHERTEXT_BYTES)},
    MASKED_INPUT: {"active": _is_id_list, "rejected": _is_id_list},
    UNMASK: {
        "seed-nodes": _is_id_list,
        "seed-shares": _is_bytes_list(SHARE_BYTES),
        "key-nodes": _is_id_list,
        "key-shares": _is_bytes_list(SHARE_BYTES),
    },
}


def check_reply_record(record: Any, run_config: Mapping[str, Any]) -> str | None:
    """Egress check of a site's ``secagg`` record (``common.wire`` record check).

    Only the protocol fields of the named stage may leave: public keys, the seed
    commitment, fixed-size ciphertexts and shares, node-id lists and the stage name
    (one of four constants). Returns the first problem naming the key, or ``None``.
    """
    if not isinstance(record, ConfigRecord):
        return f"expected a ConfigRecord, got {type(record).__name__}"
    stage = record.get("stage")
    if not isinstance(stage, str) or stage not in REPLY_FIELDS:  # a list is unhashable
        return "field 'stage' is not a secure-aggregation stage"
    fields = REPLY_FIELDS[str(stage)]
    extra = sorted(set(record) - set(fields) - {"stage"})
    if extra:
        return f"field {extra[0]!r} is not part of a {stage!r} reply"
    for key, ok in fields.items():
        if key not in record or not ok(record[key]):
            return f"field {key!r} is missing or malformed"
    return None


def masked_spec(run: RunConfig, *, model_floats: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{vector: ((L,), "uint32")}``: the only array a site sends under secure aggregation.

    ``L`` is ``model_floats``, the number of float entries of the run's model
    ``state_dict`` (the site's per-message job counts them as it builds the model,
    client/site/job.py), plus the entries of the run's secure-sum record
    (:func:`common.secure_sum.spec`).
    """
    from common import secure_sum

    length = model_floats + secure_sum.length(secure_sum.spec(run))
    return {MASKED_ARRAY: ((length,), "uint32")}
