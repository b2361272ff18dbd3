"""Fault injection decisions (client/faults.py); the mod runs end to end in
tests/integration/test_research_e2e.py."""

from client.faults import drops_out


def test_dropout_is_reproducible_per_seed_round_and_site():
    args = {"probability": 0.5, "seed": 3, "server_round": 2, "partition_id": 1}
    assert drops_out(**args) == drops_out(**args)


def test_dropout_rate_matches_the_probability():
    draws = [
        drops_out(probability=0.3, seed=7, server_round=r, partition_id=p)
        for r in range(1, 101)
        for p in range(20)
    ]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03


def test_no_dropout_at_probability_zero():
    assert not any(
        drops_out(probability=0.0, seed=1, server_round=r, partition_id=0) for r in range(50)
    )
