"""The secure-aggregation primitives: masks, key agreement, share encryption, Shamir."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from common.secagg import crypto
from common.secagg.errors import SecAggProtocolError

L = 1 << 16


def _chi_square_uniform_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square with 255 degrees of freedom: the 0.999 quantile is 330.5
CHI2_255_P999 = 330.5


def test_mask_bytes_are_uniform_chi_square():
    # Prepare
    key = bytes(range(32))
    # Execute
    mask = crypto.expand_mask(key, length=L)
    # Assert
    assert mask.dtype == np.uint32 and mask.shape == (L,)
    assert _chi_square_uniform_bytes(mask.tobytes()) < CHI2_255_P999


def test_mask_is_keyed_by_all_256_bits():
    # Prepare: two keys that differ only in the highest bit
    key_a = bytes(32)
    key_b = bytes([0x80]) + bytes(31)
    # Execute
    a = crypto.expand_mask(key_a, length=L)
    b = crypto.expand_mask(key_b, length=L)
    # Assert: unrelated streams (equal words ~ L / 2^32 by chance, correlation ~ 0)
    assert np.count_nonzero(a == b) <= 2
    assert abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]) < 0.02


def test_flower_legacy_prg_collapses_keys_that_medfed_keeps_apart():
    # Prepare: two different 256-bit secrets whose 32-bit XOR-folds are equal
    key_a = bytes(32)
    key_b = b"\x01\x00\x00\x00" * 2 + bytes(24)
    # Execute
    flower_a = pseudo_rand_gen(key_a, 2**32, [(1000,)])[0]
    flower_b = pseudo_rand_gen(key_b, 2**32, [(1000,)])[0]
    ours_a = crypto.expand_mask(key_a, length=1000)
    ours_b = crypto.expand_mask(key_b, length=1000)
    # Assert: Flower's masks are identical (32-bit seed), medfed's are not
    assert np.array_equal(flower_a, flower_b)
    assert np.count_nonzero(ours_a == ours_b) == 0


def test_mask_key_must_be_256_bits():
    with pytest.raises(SecAggProtocolError, match="32 bytes"):
        crypto.expand_mask(bytes(16), length=4)


def test_pairwise_agreement_is_symmetric_and_bound_to_session_and_pair():
    # Prepare
    sk_u, sk_v = crypto.generate_private_key(), crypto.generate_private_key()
    pk_u, pk_v = crypto.public_key(sk_u), crypto.public_key(sk_v)
    session = bytes(16)
    # Execute
    k_uv = crypto.agree(
        private_key=sk_u, peer_public_key=pk_v, purpose=b"m", session=session, node_a=1, node_b=2
    )
    k_vu = crypto.agree(
        private_key=sk_v, peer_public_key=pk_u, purpose=b"m", session=session, node_a=2, node_b=1
    )
    k_other_session = crypto.agree(
        private_key=sk_u, peer_public_key=pk_v, purpose=b"m", session=b"x" * 16, node_a=1, node_b=2
    )
    k_other_purpose = crypto.agree(
        private_key=sk_u, peer_public_key=pk_v, purpose=b"e", session=session, node_a=1, node_b=2
    )
    # Assert
    assert k_uv == k_vu and len(k_uv) == 32
    assert len({k_uv, k_other_session, k_other_purpose}) == 3


def test_pairwise_masks_of_a_pair_cancel_and_either_end_can_compute_them():
    # Prepare
    sk_u, sk_v = crypto.generate_private_key(), crypto.generate_private_key()
    pk_u, pk_v = crypto.public_key(sk_u), crypto.public_key(sk_v)
    session = bytes(16)
    # Execute: site 1 and site 2 add their terms; the server rebuilds site 1's term from sk_v
    term_u = crypto.pairwise_mask(
        private_key=sk_u, peer_public_key=pk_v, session=session, node=1, peer=2, length=64
    )
    term_v = crypto.pairwise_mask(
        private_key=sk_v, peer_public_key=pk_u, session=session, node=2, peer=1, length=64
    )
    rebuilt_u = crypto.pairwise_mask(
        private_key=sk_v, peer_public_key=pk_u, session=session, node=1, peer=2, length=64
    )
    # Assert: the smaller id adds +PRG(s_uv), the other -PRG(s_uv), mod 2^32
    assert term_u.dtype == np.uint32 and term_u.shape == (64,)
    assert not (term_u + term_v).any()
    assert np.array_equal(rebuilt_u, term_u)
    key = crypto.agree(
        private_key=sk_u,
        peer_public_key=pk_v,
        purpose=b"pairwise-mask",
        session=session,
        node_a=1,
        node_b=2,
    )
    assert np.array_equal(term_u, crypto.expand_mask(key, length=64))


def test_low_order_public_key_is_refused():
    with pytest.raises(SecAggProtocolError, match="invalid X25519"):
        crypto.agree(
            private_key=crypto.generate_private_key(),
            peer_public_key=bytes(32),
            purpose=b"m",
            session=bytes(16),
            node_a=1,
            node_b=2,
        )


def test_share_encryption_round_trip_and_route_binding():
    # Prepare
    key = bytes(range(32))
    ct = crypto.encrypt_shares(
        key=key,
        session=bytes(16),
        server_round=3,
        src=5,
        dst=9,
        index=2,
        secret_key_share=b"a" * 32,
        seed_share=b"b" * 32,
    )
    # Execute
    index, s_share, b_share = crypto.decrypt_shares(
        key=key, session=bytes(16), server_round=3, src=5, dst=9, ciphertext=ct
    )
    # Assert
    assert (index, s_share, b_share) == (2, b"a" * 32, b"b" * 32)
    assert b"a" * 32 not in ct
    with pytest.raises(SecAggProtocolError, match="authentication"):  # replayed to another site
        crypto.decrypt_shares(
            key=key, session=bytes(16), server_round=3, src=5, dst=8, ciphertext=ct
        )
    with pytest.raises(SecAggProtocolError, match="authentication"):  # replayed next round
        crypto.decrypt_shares(
            key=key, session=bytes(16), server_round=4, src=5, dst=9, ciphertext=ct
        )
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(SecAggProtocolError, match="authentication"):
        crypto.decrypt_shares(
            key=key, session=bytes(16), server_round=3, src=5, dst=9, ciphertext=tampered
        )


def test_shamir_32_byte_secret_any_t_shares_rebuild_fewer_do_not():
    # Prepare
    secret = crypto.random_seed()
    shares = crypto.split_secret(secret, threshold=3, holders=5)
    indexed = list(enumerate(shares, start=1))
    # Execute / Assert
    assert crypto.combine_secret([indexed[0], indexed[2], indexed[4]]) == secret
    assert crypto.combine_secret([indexed[1], indexed[3], indexed[4]]) == secret
    assert crypto.combine_secret(indexed[:2]) != secret


def test_commitment_distinguishes_seeds():
    seed = crypto.random_seed()
    assert crypto.commit(seed) == crypto.commit(bytes(seed))
    assert crypto.commit(seed) != crypto.commit(bytes([seed[0] ^ 1]) + seed[1:])
