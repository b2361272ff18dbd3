"""The communication graph of SecAgg+ (Bell et al. 2020, section 3.1).

Each site shares its secrets with, and masks against, only its neighbours. medfed uses
the complete graph when ``k >= n - 1`` (SecAgg, Bonawitz et al. 2017) and otherwise a
ring ("Harary") graph over a random permutation of the sites: site at ring position
``i`` is joined to positions ``i +- 1, ..., i +- k/2`` (``k`` rounded up to even), so
every site has exactly ``k`` neighbours and the graph is symmetric.
"""

from __future__ import annotations

import secrets


def neighbourhoods(nodes: list[int], *, k: int) -> dict[int, list[int]]:
    """Return ``{node: sorted neighbourhood including the node itself}``.

    Parameters
    ----------
    nodes : list[int]
        Node ids of the sites that advertised keys (distinct).
    k : int
        Wanted neighbours per site; ``0`` or ``>= len(nodes) - 1`` gives the complete
        graph.

    Returns
    -------
    dict[int, list[int]]
        Symmetric: ``v in result[u]`` iff ``u in result[v]``.

    """
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("node ids must be distinct")
    if k == 0 or k >= n - 1:
        full = sorted(nodes)
        return {u: list(full) for u in nodes}
    half = (k + 1) // 2
    if 2 * half >= n - 1:
        full = sorted(nodes)
        return {u: list(full) for u in nodes}
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)  # OS CSPRNG: the graph is not predictable
    out: dict[int, list[int]] = {}
    for i, u in enumerate(order):
        nbrs = {order[(i + d) % n] for d in range(-half, half + 1)}
        out[u] = sorted(nbrs)
    return out
