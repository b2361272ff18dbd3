"""Seeded partitioners that split a labelled dataset into virtual sites.

Each returns a list of ``num_sites`` int64 index arrays (sorted, disjoint, covering the
input).

- IID: a seeded permutation cut into near-equal parts.
- Dirichlet label skew: for every class, the class's indices are split across sites in
  proportions drawn from Dirichlet(alpha); small alpha gives few classes per site
  (Hsu, Qi & Brown 2019, arXiv:1909.06335; as in Flower Datasets'
  ``DirichletPartitioner``). Redrawn until every site holds at least ``min_size``.
- Quantity skew: site sizes from Dirichlet(alpha), labels IID (Li et al., ICDE 2022).
- Natural: one site per value of a real site column (e.g. the hospital of a record).
"""

from __future__ import annotations

import numpy as np

from common.errors import ConfigError


def _check(num_sites: int, n: int) -> None:
    if num_sites < 1:
        raise ConfigError(f"number of sites must be >= 1, got {num_sites}")
    if num_sites > n:
        raise ConfigError(f"cannot split {n} examples into {num_sites} non-empty sites")


def iid_partition(labels: np.ndarray, num_sites: int, *, seed: int) -> list[np.ndarray]:
    """Split indices uniformly at random into ``num_sites`` near-equal parts.

    Raises
    ------
    ConfigError
        If ``num_sites < 1`` or exceeds the number of examples.

    """
    n = int(np.asarray(labels).shape[0])
    _check(num_sites, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_sites)]


def dirichlet_partition(
    labels: np.ndarray,
    num_sites: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: per-class site proportions drawn from Dirichlet(alpha).

    Parameters
    ----------
    labels : numpy.ndarray
        int ``(N,)`` class indices.
    num_sites : int
        Number of sites, >= 1.
    alpha : float
        Concentration, > 0; smaller is more skewed (0.1 strong, 100 nearly IID).
    seed : int
        Seed of the NumPy generator.
    min_size : int
        Every site gets at least this many examples.
    max_tries : int
        Redraws before giving up.

    Raises
    ------
    ConfigError
        For a non-positive ``alpha``, too many sites, or when no draw satisfies
        ``min_size`` (lower ``min_size`` or raise ``alpha``).

    """
    y = np.asarray(labels).reshape(-1)
    n = int(y.shape[0])
    _check(num_sites, n)
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_sites * min_size > n:
        raise ConfigError(f"{num_sites} sites x min_size {min_size} exceeds {n} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {num_sites} sites >= {min_size} "
        "examples; raise alpha or use fewer sites."
    )


def quantity_skew_partition(
    labels: np.ndarray,
    num_sites: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Quantity skew: site sizes drawn from Dirichlet(alpha), labels shuffled IID.

    Every site gets ``min_size`` examples, and the remaining ``N - num_sites * min_size``
    are shared in proportions ``q ~ Dir(alpha * 1)`` (Li, Diao, Chen & He, "Federated
    Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022, section IV-C).
    Small ``alpha`` gives very unequal sites; the label mix of each site stays IID.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(N,)`` labels (only their number is used).
    num_sites : int
        Number of sites, >= 1.
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed of the NumPy generator.
    min_size : int
        Floor on every site's size, >= 0.

    Returns
    -------
    list[numpy.ndarray]
        ``num_sites`` sorted, disjoint int64 index arrays covering ``range(N)``.

    Raises
    ------
    ConfigError
        For ``alpha <= 0``, too many sites, or ``num_sites * min_size > N``.

    """
    n = int(np.asarray(labels).shape[0])
    _check(num_sites, n)
    if not alpha > 0:
        raise ConfigError(f"quantity-skew alpha must be > 0, got {alpha}")
    if min_size < 0 or num_sites * min_size > n:
        raise ConfigError(
            f"{num_sites} sites x min_size {min_size} does not fit {n} examples; "
            "lower min_size or use fewer sites."
        )
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(num_sites, alpha))
    extra = n - num_sites * min_size
    sizes = np.floor(props * extra).astype(np.int64)
    # hand the rounding remainder to the largest fractional parts (sizes sum to N)
    remainder = extra - int(sizes.sum())
    order = np.argsort(-(props * extra - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    sizes += min_size
    perm = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p).astype(np.int64) for p in np.split(perm, cuts)]


def natural_partition(sites: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Natural split: one site per distinct value of a real site column.

    Parameters
    ----------
    sites : numpy.ndarray
        ``(N,)`` site identifier of every example (e.g. the hospital a record came from).

    Returns
    -------
    names : list[str]
        The distinct site identifiers, sorted (site ``i`` is ``names[i]``).
    parts : list[numpy.ndarray]
        Sorted int64 indices of each site's examples.

    Raises
    ------
    ConfigError
        If ``sites`` is empty.

    """
    col = np.asarray(sites).reshape(-1)
    if col.size == 0:
        raise ConfigError("natural split: the site column is empty")
    names = sorted({str(v) for v in col.tolist()})
    as_str = np.asarray([str(v) for v in col.tolist()])
    return names, [np.flatnonzero(as_str == name).astype(np.int64) for name in names]
