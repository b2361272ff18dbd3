"""Thin wrappers over vetted primitives: nothing here is a self-written cipher, hash or RNG.

* Key agreement: X25519 (``cryptography``), one key pair for share encryption and one for
  pairwise masks per site and round (Bonawitz et al. 2017, section 4, round 0).
* Key derivation: HKDF-SHA256 (RFC 5869, ``cryptography``) with a protocol label, the
  round's session nonce and the sorted pair of node ids in ``info``.
* Share encryption: AES-256-GCM (``cryptography``), random 96-bit nonce, the route
  (session, round, sender, receiver) as associated data.
* Mask expansion: the AES-256-CTR keystream (``cryptography``) under a full 256-bit key,
  read as little-endian ``uint32`` words (Bonawitz et al. 2017, section 3: PRG).
* Secret sharing: Shamir over GF(2^128) from pycryptodome (``Crypto.Protocol.
  SecretSharing.Shamir``, 16-byte secrets); a 32-byte secret is shared as two 16-byte
  halves with the same holder indices.
* Commitment to a self-mask seed: SHA-256 (``cryptography``).
* Randomness: ``os.urandom`` (the OS CSPRNG) via ``cryptography``'s key generation and
  pycryptodome's ``get_random_bytes``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from common.secagg.errors import SecAggProtocolError
from common.secagg.params import PROTOCOL_LABEL

KEY_BYTES = 32
#: One Shamir share of a 32-byte secret: two 16-byte GF(2^128) values.
SHARE_BYTES = 32
_NONCE_BYTES = 12
_CTR_NONCE = bytes(16)  # each mask key is used for exactly one keystream
# (source, destination, holder index) then the two shares, see encrypt_shares
_SHARE_HEADER = struct.Struct(">QQH")
SHARE_PLAINTEXT_BYTES = _SHARE_HEADER.size + 2 * SHARE_BYTES
#: Length of one encrypted share bundle: nonce + plaintext + 16-byte GCM tag.
CIPHERTEXT_BYTES = _NONCE_BYTES + SHARE_PLAINTEXT_BYTES + 16


def generate_private_key() -> bytes:
    """Return a fresh X25519 private key as 32 raw bytes (OS CSPRNG)."""
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private_key: bytes) -> bytes:
    """Return the 32-byte raw X25519 public key of a raw private key.

    Raises
    ------
    SecAggProtocolError
        If ``private_key`` is not 32 bytes.

    """
    _check_len("private key", private_key, KEY_BYTES)
    return (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def random_seed() -> bytes:
    """Return 32 bytes from the OS CSPRNG (a self-mask seed ``b_u``)."""
    return os.urandom(KEY_BYTES)


def commit(seed: bytes) -> bytes:
    """SHA-256 of ``seed``: lets the server verify a rebuilt self-mask seed."""
    h = hashes.Hash(hashes.SHA256())
    h.update(PROTOCOL_LABEL + b"/self-mask-commitment")
    h.update(seed)
    return h.finalize()


def agree(
    *,
    private_key: bytes,
    peer_public_key: bytes,
    purpose: bytes,
    session: bytes,
    node_a: int,
    node_b: int,
) -> bytes:
    """X25519 agreement followed by HKDF-SHA256 into a 256-bit key.

    Both ends derive the same key: the node ids enter ``info`` sorted.

    Parameters
    ----------
    private_key, peer_public_key : bytes
        Raw 32-byte X25519 keys.
    purpose : bytes
        Domain separation, e.g. ``b"share-encryption"`` or ``b"pairwise-mask"``.
    session : bytes
        The round's random session nonce (HKDF salt), so keys never repeat across rounds.
    node_a, node_b : int
        The two Flower node ids (unsigned 64-bit).

    Returns
    -------
    bytes
        32 bytes (HKDF, RFC 5869, SHA-256).

    Raises
    ------
    SecAggProtocolError
        For a malformed or low-order peer key (``cryptography`` refuses an all-zero
        shared secret).

    """
    _check_len("peer public key", peer_public_key, KEY_BYTES)
    try:
        shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public_key)
        )
    except ValueError as exc:
        raise SecAggProtocolError(f"invalid X25519 public key: {exc}") from exc
    lo, hi = sorted((node_a, node_b))
    info = PROTOCOL_LABEL + b"/" + purpose + struct.pack(">QQ", lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(shared)


def expand_mask(key: bytes, *, length: int) -> NDArray[np.uint32]:
    """Expand a 256-bit key into ``length`` uniform ``uint32`` words (AES-256-CTR keystream).

    Parameters
    ----------
    key : bytes
        32 bytes: the full derived key is the AES-256 key (no folding to a shorter seed).
    length : int
        Number of 32-bit words, >= 0.

    Returns
    -------
    numpy.ndarray
        Shape ``(length,)``, dtype ``uint32``, little-endian words of the keystream.

    Raises
    ------
    SecAggProtocolError
        If ``key`` is not 32 bytes.

    """
    _check_len("mask key", key, KEY_BYTES)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES256(key), modes.CTR(_CTR_NONCE)).encryptor()
    # keystream = AES-CTR encryption of zeros, in place in a zeroed, writable buffer
    out = bytearray(4 * length + 15)  # update_into needs block_size - 1 spare bytes
    written = encryptor.update_into(memoryview(out)[: 4 * length], out)
    encryptor.finalize()
    if written != 4 * length:
        raise RuntimeError(f"AES-CTR produced {written} bytes, expected {4 * length}")
    return np.frombuffer(out, dtype="<u4", count=length).astype(np.uint32, copy=False)


def pairwise_mask(
    *,
    private_key: bytes,
    peer_public_key: bytes,
    session: bytes,
    node: int,
    peer: int,
    length: int,
) -> NDArray[np.uint32]:
    """Return the pairwise-mask term that site ``node`` adds to its masked input for ``peer``.

    ``sign(node, peer) * PRG(s_{node,peer}) mod 2^32`` with ``sign = +1`` if
    ``node < peer`` else ``-1`` (Bonawitz et al., CCS 2017, section 3), so the two terms
    of a pair cancel in the sum. ``s`` is :func:`agree` with purpose ``b"pairwise-mask"``
    and the PRG is :func:`expand_mask` keyed by the whole derived key. The one place both
    sides take the convention from: a site adds its terms (``client/secagg_mod.py``); the
    coordinator, having rebuilt the mask key of a site ``u`` that left, subtracts the term
    each survivor ``v`` added for it (``node=v, peer=u``; the agreement is symmetric).

    Parameters
    ----------
    private_key, peer_public_key : bytes
        The raw X25519 mask private key of one end of the pair and the public key of
        the other end (either way round).
    session : bytes
        The round's session nonce.
    node, peer : int
        Whose term it is, and for which neighbour.
    length : int
        Words of the masked vector.

    Returns
    -------
    numpy.ndarray
        ``(length,)`` ``uint32``.

    Raises
    ------
    SecAggProtocolError
        For a malformed or low-order public key (see :func:`agree`).

    """
    key = agree(
        private_key=private_key,
        peer_public_key=peer_public_key,
        purpose=b"pairwise-mask",
        session=session,
        node_a=node,
        node_b=peer,
    )
    mask = expand_mask(key, length=length)
    return mask if node < peer else np.negative(mask, out=mask)


def split_secret(secret: bytes, *, threshold: int, holders: int) -> list[bytes]:
    """Shamir-share a 32-byte secret; share ``j`` (0-based) belongs to holder index ``j+1``.

    Parameters
    ----------
    secret : bytes
        32 bytes (a raw X25519 private key or a self-mask seed).
    threshold : int
        Shares needed to rebuild, ``2 <= threshold <= holders``.
    holders : int
        Number of shares.

    Returns
    -------
    list[bytes]
        ``holders`` shares of :data:`SHARE_BYTES` bytes.

    """
    _check_len("secret", secret, KEY_BYTES)
    if not 2 <= threshold <= holders:
        raise ValueError(f"need 2 <= threshold ({threshold}) <= holders ({holders})")
    hi = Shamir.split(threshold, holders, secret[:16], ssss=False)
    lo = Shamir.split(threshold, holders, secret[16:], ssss=False)
    return [h[1] + low[1] for h, low in zip(hi, lo, strict=True)]


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """Rebuild a 32-byte secret from exactly ``threshold`` ``(holder index, share)`` pairs.

    Raises
    ------
    SecAggProtocolError
        For a share of the wrong length or duplicate indices.

    """
    for _, share in shares:
        _check_len("share", share, SHARE_BYTES)
    try:
        hi = Shamir.combine([(i, s[:16]) for i, s in shares], ssss=False)
        lo = Shamir.combine([(i, s[16:]) for i, s in shares], ssss=False)
    except ValueError as exc:
        raise SecAggProtocolError(f"cannot combine shares: {exc}") from exc
    return bytes(hi) + bytes(lo)


def _aad(session: bytes, server_round: int, src: int, dst: int) -> bytes:
    return PROTOCOL_LABEL + b"/shares" + session + struct.pack(">QQQ", server_round, src, dst)


def encrypt_shares(
    *,
    key: bytes,
    session: bytes,
    server_round: int,
    src: int,
    dst: int,
    index: int,
    secret_key_share: bytes,
    seed_share: bytes,
) -> bytes:
    """Encrypt the shares ``src`` gives ``dst`` (Bonawitz et al. 2017, Fig. 4, round 1).

    Returns
    -------
    bytes
        ``nonce (12) || AES-256-GCM ciphertext+tag`` of
        ``src || dst || index || share(s_sk) || share(b)``.

    """
    plaintext = _SHARE_HEADER.pack(src, dst, index) + secret_key_share + seed_share
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(session, server_round, src, dst))


def decrypt_shares(
    *, key: bytes, session: bytes, server_round: int, src: int, dst: int, ciphertext: bytes
) -> tuple[int, bytes, bytes]:
    """Decrypt and check shares from ``src`` (Bonawitz et al. 2017, Fig. 4, round 2).

    Returns
    -------
    tuple[int, bytes, bytes]
        ``(holder index, share of s_sk, share of b)``.

    Raises
    ------
    SecAggProtocolError
        If authentication fails or the plaintext names another route.

    """
    if len(ciphertext) <= _NONCE_BYTES:
        raise SecAggProtocolError(f"share ciphertext from node {src} is too short")
    try:
        plaintext = AESGCM(key).decrypt(
            ciphertext[:_NONCE_BYTES],
            ciphertext[_NONCE_BYTES:],
            _aad(session, server_round, src, dst),
        )
    except InvalidTag as exc:
        raise SecAggProtocolError(f"share ciphertext from node {src} fails authentication") from exc
    if len(plaintext) != SHARE_PLAINTEXT_BYTES:
        raise SecAggProtocolError(f"share plaintext from node {src} has the wrong length")
    p_src, p_dst, index = _SHARE_HEADER.unpack_from(plaintext)
    if (p_src, p_dst) != (src, dst):
        raise SecAggProtocolError(f"shares from node {src} name route {p_src}->{p_dst}")
    body = plaintext[_SHARE_HEADER.size :]
    return int(index), body[:SHARE_BYTES], body[SHARE_BYTES:]


def _check_len(name: str, value: bytes, n: int) -> None:
    if not isinstance(value, bytes) or len(value) != n:
        raise SecAggProtocolError(
            f"{name} must be {n} bytes, got {len(value) if isinstance(value, bytes) else value!r}"
        )
