"""Fixed-point encoding of weighted deltas, the documented error bound, and the config."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig, SecAggConfig
from common.errors import ConfigError
from common.secagg.encoding import (
    Layout,
    apply_mean_delta,
    check_clip_range,
    decode_mean,
    encode,
    flat_delta,
    quantisation_step,
)
from common.secagg.errors import ClipRangeError, SecAggProtocolError
from common.secagg.graph import neighbourhoods


def _sum_mod(vs):
    total = np.zeros_like(vs[0])
    for v in vs:
        total += v
    return total


@pytest.mark.parametrize("stochastic", [False, True])
def test_weighted_mean_decodes_within_documented_bound(stochastic):
    # Prepare: 4 sites, unequal weights, deltas inside [-c, c]
    rng = np.random.default_rng(0)
    c, n = 2.0, 4
    weights = [10.0, 300.0, 55.0, 1.0]
    deltas = [rng.uniform(-c, c, 1000) for _ in range(n)]
    total_w = sum(weights)
    step = quantisation_step(clip_range=c, total_weight=total_w)
    # Execute
    encoded = [
        encode(d, weight=w, step=step, stochastic=stochastic, rng=rng)
        for d, w in zip(deltas, weights, strict=True)
    ]
    mean = decode_mean(_sum_mod(encoded), step=step, total_weight=total_w)
    # Assert: deterministic n*s/(2W), stochastic n*s/W
    exact = sum(w * d for w, d in zip(weights, deltas, strict=True)) / total_w
    bound = n * step / total_w / (1 if stochastic else 2)
    assert np.max(np.abs(mean - exact)) <= bound
    assert bound <= n * c / 2**30


def test_extreme_deltas_do_not_wrap():
    # Prepare: every site at +c (or -c): the largest possible sum
    c, weights = 1.0, [3.0, 5.0, 7.0]
    step = quantisation_step(clip_range=c, total_weight=sum(weights))
    for sign in (1.0, -1.0):
        enc = [encode(np.full(3, sign * c), weight=w, step=step, stochastic=False) for w in weights]
        # Execute
        mean = decode_mean(_sum_mod(enc), step=step, total_weight=sum(weights))
        # Assert
        np.testing.assert_allclose(mean, sign * c, rtol=0, atol=1e-8)


def test_delta_beyond_clip_range_fails_loudly_naming_the_key():
    with pytest.raises(ClipRangeError, match=r"secagg\.clip-range"):
        check_clip_range(np.array([0.1, -4.5]), clip_range=4.0)
    with pytest.raises(ClipRangeError):
        check_clip_range(np.array([np.nan]), clip_range=4.0)
    check_clip_range(np.array([4.0, -4.0]), clip_range=4.0)


def test_layout_masks_float_arrays_and_refuses_changed_integer_buffers():
    # Prepare
    glob = {"w": np.ones((2, 2), np.float32), "n": np.array([3], np.int64)}
    trained = {"w": np.full((2, 2), 1.5, np.float32), "n": np.array([3], np.int64)}
    layout = Layout.of(glob)
    # Execute
    delta = flat_delta(trained=trained, global_state=glob, layout=layout)
    new = apply_mean_delta(glob, delta, layout=layout)
    # Assert
    assert layout.masked_keys == ("w",) and layout.length == 4
    np.testing.assert_array_equal(delta, 0.5)
    np.testing.assert_array_equal(new["w"], trained["w"])
    assert new["w"].dtype == np.float32 and new["n"].dtype == np.int64
    changed = {**trained, "n": np.array([4], np.int64)}
    with pytest.raises(SecAggProtocolError, match="non-float array 'n'"):
        flat_delta(trained=changed, global_state=glob, layout=layout)


def test_runconfig_secagg_keys_and_validation():
    run = RunConfig.from_run_config(
        {"secagg.enabled": True, "secagg.neighbours": 6, "secagg.threshold": 0.6}
    )
    params = run.secagg
    assert (params.neighbours, params.threshold) == (6, 0.6)
    with pytest.raises(ConfigError, match=r"secagg\.threshold"):
        RunConfig.from_run_config({"secagg.threshold": 0.3})
    with pytest.raises(ConfigError, match=r"secagg\.quantisation"):
        RunConfig.from_run_config({"secagg.quantisation": "round"})
    with pytest.raises(ConfigError, match=r"secagg\.clip-range"):
        SecAggConfig(clip_range=float("inf"))


@pytest.mark.parametrize(("n", "k", "degree"), [(3, 0, 2), (10, 0, 9), (10, 4, 4), (11, 3, 4)])
def test_neighbourhoods_are_symmetric_and_regular(n, k, degree):
    nodes = list(range(100, 100 + n))
    graph = neighbourhoods(nodes, k=k)
    assert all(u in graph[u] and len(graph[u]) == degree + 1 for u in nodes)
    assert all(u in graph[v] for u in nodes for v in graph[u])
