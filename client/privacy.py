"""Differential privacy at the site: Opacus DP-SGD and the site's own privacy ledger.

Privacy model (DESIGN section 5):

- Every site trains with DP-SGD (Abadi et al., CCS 2016) through Opacus
  (``PrivacyEngine.make_private``: Poisson sampling, per-sample clipping to
  ``dp.max-grad-norm``, Gaussian noise ``noise_multiplier * C``, ``grad_sample_mode=
  "hooks"``) and ``BatchMemoryManager`` so a logical batch is split into physical
  batches that fit memory.
- The site owns its privacy ledger (:class:`PrivacyLedger`): the accountant history
  ``[(noise_multiplier, sample_rate, steps), ...]`` per project and dataset fingerprint,
  in ``<state-dir>/privacy-ledger.json``, authenticated with HMAC-SHA256 under a
  site-local key (``cryptography``), written atomically. Every ClientApp message runs in
  a fresh process and a SuperNode can restart, so the ledger is the only truth: it is
  read before and written after every round. A missing ledger starts at zero; a corrupt
  or tampered one makes the site refuse to train.
- Before a round the site computes the epsilon its planned steps would reach
  (accountant over the ledger history plus the planned steps) and refuses with
  :class:`PrivacyBudgetError` if that crosses its ceiling ``dp-max-epsilon`` (node
  config, set by the hospital).
- The noise multiplier is either given (``dp.noise-multiplier``) or derived once per
  run from ``dp.target-epsilon`` over the whole planned training (all rounds x local
  epochs) with ``opacus.accountants.utils.get_noise_multiplier``, then stored in the
  ledger so every later round of that run uses the same value. Reported epsilon is
  always cumulative over the ledger, never per round (Flower's Opacus example resets
  the accountant each round).

DP randomness (DESIGN section 5): the Gaussian noise and the Poisson sampling of every
round are drawn from torch generators seeded at the site with 64 bits from the operating
system's CSPRNG (:func:`secrets.randbits`, i.e. ``os.urandom``), fresh for every round;
nothing the coordinator knows (run seed, round, site id) determines them. Opacus's own
``secure_mode`` needs ``torchcsprng``, which has no build for torch 2.x (none on the
registry here; the project is archived), so ``PrivacyEngine(secure_mode=True)`` raises
ImportError. medfed instead switches the DP optimizer to secure mode's noise algorithm
(the sum of four Gaussian draws, robust to the floating-point attack of Jin et al. 2021,
arXiv:2112.05307, following Holohan & Braghin 2021, arXiv:2107.10138, section 5.1) on
the OS-seeded generator: :class:`DPRandomness`. Reproducible noise exists only as the
simulation switch ``dp.reproducible-noise`` (:meth:`DPRandomness.seeded`), which
is refused outside simulation and labelled "not private" everywhere it is reported.

Delta defaults to ``0.1 / N`` for ``N`` training examples (below ``1 / N``). The unit of
privacy is one training example; in every dataset medfed writes today one example is
one patient (``groups`` in the site dataset are all distinct); with several images per
patient the guarantee holds per image, and the manifest's groups say so.
"""

from __future__ import annotations

import contextlib
import hmac as std_hmac
import json
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from torch import nn
from torch.utils.data import DataLoader

from common.errors import MedfedError

# Opacus is imported inside the functions that use it ("lazy Opacus import"): with
# SciPy it takes ~1.5 s, and under the deployment engine every Flower message runs in a
# fresh ClientApp process, so an evaluate message should not pay for it.

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
KEY_FILE = "privacy-ledger.key"
FORMAT = "medfed-privacy-ledger"
VERSION = 1

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class DPRandomness:
    """The generators one DP round samples batches and draws noise from.

    Build it with :meth:`secret` (every real round) or :meth:`seeded` (simulation
    research only, NOT PRIVATE); never from a seed in run config.

    Attributes
    ----------
    sampling : torch.Generator
        CPU generator for Opacus's Poisson sampling (``UniformWithReplacementSampler``).
    noise : torch.Generator
        Generator on the training device for the Gaussian noise of ``DPOptimizer``.
    reproducible : bool
        True when both were seeded from a known seed: the noise is then predictable by
        whoever knows that seed and gives no differential privacy against them.
    """

    sampling: torch.Generator
    noise: torch.Generator
    reproducible: bool

    @classmethod
    def secret(cls, device: torch.device) -> DPRandomness:
        """Seed both generators with 64 bits each from the OS CSPRNG (``os.urandom``).

        Called once per round at the site, so no two rounds (or runs) share a draw.
        torch's CPU generator is MT19937 and its CUDA generator Philox; both take a
        64-bit seed, so an attacker who sees only aggregated, noised updates would have
        to search 2**64 seeds per generator and round.
        """
        return cls(
            sampling=torch.Generator().manual_seed(secrets.randbits(64)),
            noise=torch.Generator(device=device).manual_seed(secrets.randbits(64)),
            reproducible=False,
        )

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> DPRandomness:
        """Build generators from a known ``seed``: simulation research only, NOT PRIVATE.

        Parameters
        ----------
        seed : int
            Any integer; the noise generator uses ``seed + 7``.
        device : torch.device
            Device of the noise generator (the training device).
        """
        log.warning(
            "dp.reproducible-noise: DP noise and sampling are seeded from the run config; "
            "this run is NOT PRIVATE against anyone who knows the seed (simulation only)"
        )
        return cls(
            sampling=torch.Generator().manual_seed(seed),
            noise=torch.Generator(device=device).manual_seed(seed + 7),
            reproducible=True,
        )


class PrivacyError(MedfedError, RuntimeError):
    """The site cannot account for privacy (unreadable, corrupt or tampered ledger)."""


class PrivacyBudgetError(MedfedError, RuntimeError):
    """Training this round would take the site past its epsilon ceiling."""


def default_delta(num_examples: int) -> float:
    """Return ``0.1 / N``, a delta below ``1 / N`` for ``N`` training patients.

    Raises
    ------
    PrivacyError
        If ``num_examples < 1``.
    """
    if num_examples < 1:
        raise PrivacyError("cannot train with DP on an empty training split")
    return 0.1 / num_examples


def epsilon_of(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of an accountant history, computed by Opacus.

    Parameters
    ----------
    history : list of (noise_multiplier, sample_rate, steps)
        Opacus accountant history.
    delta : float
        Target delta.
    accountant : str
        ``"rdp"`` (Mironov 2017) or ``"prv"`` (Gopi et al. 2021).

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history.
    """
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # lazy Opacus import

    acc = create_accountant(mechanism=accountant)
    acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": accountant})
    return float(acc.get_epsilon(delta=delta))


def ledger_key(project: str, dataset_fingerprint: str) -> str:
    """Ledger entry key: the project name and the dataset's fingerprint."""
    return f"{project}/{dataset_fingerprint}"


class PrivacyLedger:
    """The site's persistent, authenticated record of privacy spent.

    Parameters
    ----------
    state_dir : pathlib.Path
        The site's state directory (node config ``state-dir``); created if missing.

    Raises
    ------
    PrivacyError
        On read: a ledger that is not valid JSON, has an unknown format, fails its
        HMAC check, or exists without its key. Never silently reset.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.key_path = self.state_dir / KEY_FILE

    # ------------------------------------------------------------------ key + MAC
    def _key(self, *, create: bool) -> bytes:
        if self.key_path.is_file():
            key = self.key_path.read_bytes()
            if len(key) != 32:
                raise PrivacyError(f"ledger key {self.key_path} is not 32 bytes; refusing")
            return key
        if not create:
            raise PrivacyError(
                f"{self.path} exists but its key {self.key_path.name} is missing: the ledger "
                "cannot be verified, so the site refuses to train. Restore the key from backup."
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32)  # OS CSPRNG
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key

    @staticmethod
    def _mac(key: bytes, body: dict[str, Any]) -> str:
        h = crypto_hmac.HMAC(key, hashes.SHA256())
        h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        return h.finalize().hex()

    # ---------------------------------------------------------------- read / write
    def read(self) -> dict[str, Any]:
        """Return all entries (``{}`` when no ledger exists yet), after verification."""
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
            mac = doc.pop("mac")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise PrivacyError(
                f"privacy ledger {self.path} is corrupt ({exc}); the site refuses to train "
                "rather than reset its budget. Restore it from backup."
            ) from exc
        expected = self._mac(self._key(create=False), doc)
        if not std_hmac.compare_digest(str(mac), expected):
            raise PrivacyError(
                f"privacy ledger {self.path} fails its integrity check (edited or tampered); "
                "the site refuses to train. Restore it from backup."
            )
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise PrivacyError(f"privacy ledger {self.path} has an unknown format/version")
        entries: dict[str, Any] = doc["entries"]
        return entries

    def write(self, entries: dict[str, Any]) -> None:
        """Authenticate and atomically replace the ledger with ``entries``."""
        body = {"format": FORMAT, "version": VERSION, "entries": entries}
        doc = dict(body, mac=self._mac(self._key(create=True), body))
        tmp = self.path.with_name(f".{LEDGER_FILE}.tmp-{os.getpid()}")
        with tmp.open("w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def entry(self, key: str) -> dict[str, Any]:
        """Return one entry (empty history when the project/dataset is new)."""
        return dict(self.read().get(key, {"history": [], "plans": {}}))

    def update(self, key: str, entry: dict[str, Any]) -> None:
        """Replace one entry (read-verify-modify-write)."""
        entries = self.read()
        entries[key] = dict(entry, updated=datetime.now(UTC).isoformat(timespec="seconds"))
        self.write(entries)


@dataclass(frozen=True, kw_only=True)
class DPPlan:
    """The DP parameters of one site for one round.

    Attributes
    ----------
    noise_multiplier : float
        Gaussian noise std divided by the clipping norm.
    max_grad_norm : float
        Per-sample clipping norm ``C``.
    sample_rate : float
        Poisson sampling rate ``q = 1 / ceil(N / batch_size)`` (as Opacus derives it).
    steps : int
        Optimizer steps this round: ``local_epochs * ceil(N / batch_size)``.
    delta : float
        The site's delta.
    accountant : str
        ``rdp`` or ``prv``.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str


def plan_round(
    *,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    max_grad_norm: float,
    delta: float,
    accountant: str,
    noise_multiplier: float | None,
    target_epsilon: float,
) -> DPPlan:
    """Plan one round's DP-SGD; derive the noise multiplier for the whole run if needed.

    Parameters
    ----------
    num_examples : int
        ``N``, training examples at the site.
    batch_size : int
        Expected logical batch size (Poisson sampling makes it random).
    local_epochs, num_rounds : int
        Planned local epochs per round and rounds in the run.
    max_grad_norm : float
        Clipping norm ``C``.
    delta : float
        The site's delta.
    accountant : str
        ``rdp`` or ``prv``.
    noise_multiplier : float or None
        A fixed sigma (given in the run config, or the value stored in the ledger for
        this run). None or 0: derive it.
    target_epsilon : float
        Used only when deriving: sigma is the smallest value for which
        ``num_rounds * local_epochs`` epochs of Poisson-sampled steps reach
        ``target_epsilon`` at ``delta`` (Opacus ``get_noise_multiplier``).

    Returns
    -------
    DPPlan
    """
    batches = -(-num_examples // batch_size)  # ceil
    sample_rate = 1.0 / batches
    steps = local_epochs * batches
    if not noise_multiplier:
        from opacus.accountants.utils import get_noise_multiplier  # lazy Opacus import

        noise_multiplier = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps * num_rounds,
                accountant=accountant,
            )
        )
    return DPPlan(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )


def check_budget(history: History, plan: DPPlan, *, max_epsilon: float) -> float:
    """Return the epsilon after this round's planned steps; refuse if over the ceiling.

    Raises
    ------
    PrivacyBudgetError
        If the projected cumulative epsilon exceeds ``max_epsilon``; nothing is trained.
    """
    spent = epsilon_of(history, delta=plan.delta, accountant=plan.accountant)
    planned = [*history, (plan.noise_multiplier, plan.sample_rate, plan.steps)]
    projected = epsilon_of(planned, delta=plan.delta, accountant=plan.accountant)
    if projected > max_epsilon:
        raise PrivacyBudgetError(
            f"privacy budget: this round would take epsilon from {spent:.3f} to "
            f"{projected:.3f} (delta {plan.delta:.2e}), above this site's ceiling "
            f"dp-max-epsilon={max_epsilon:g}; the site refuses to train"
        )
    return projected


@dataclass
class PrivateTraining:
    """The objects a DP round trains with, and the epsilon it spent (after exit)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    plan: DPPlan
    epsilon: float = 0.0


@contextlib.contextmanager
def private_training(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    plan: DPPlan,
    ledger: PrivacyLedger,
    key: str,
    run_id: int,
    max_epsilon: float,
    max_physical_batch_size: int,
    randomness: DPRandomness,
) -> Iterator[PrivateTraining]:
    """Check the budget, make the training objects private, and record what was spent.

    Poisson sampling and noise come only from ``randomness`` (the generator ``loader``
    was built with is replaced), and the DP optimizer draws its noise with Opacus's
    ``secure_mode`` algorithm (see the module docstring for why not its csprng).

    The ledger entry's history is loaded into a fresh Opacus accountant before any
    step, and whatever the accountant recorded is written back on exit, also when
    training fails midway (steps taken have spent privacy).

    Raises
    ------
    PrivacyBudgetError
        Before any training step, if the round would cross ``max_epsilon``.
    PrivacyError
        If the ledger is corrupt or tampered.
    """
    entry = ledger.entry(key)
    history: History = [tuple(h) for h in entry.get("history", [])]
    check_budget(history, plan, max_epsilon=max_epsilon)

    from opacus import GradSampleModule, PrivacyEngine  # lazy Opacus import
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with warnings.catch_warnings():
        # PrivacyEngine(secure_mode=False) warns "Secure RNG turned off ... turn it on
        # before production". Here the generators are not Opacus's default: they are
        # seeded per round from os.urandom (DPRandomness.secret) and the optimizer is put
        # into secure mode's noise algorithm below; torchcsprng, the only thing missing,
        # cannot be installed for torch 2.x. A reproducible (not private) run is logged
        # loudly by DPRandomness.seeded instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=plan.accountant)
    engine.accountant.load_state_dict({"history": list(history), "mechanism": plan.accountant})
    # Opacus's Poisson sampler takes the generator of the loader it wraps
    # (DPDataLoader.from_data_loader): give it the round's secret one.
    sampled = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        generator=randomness.sampling,
        num_workers=0,
        pin_memory=loader.pin_memory,
    )
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=sampled,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="hooks",
        noise_generator=randomness.noise,
    )
    # Secure mode's noise: four draws summed and halved (opacus.optimizers.optimizer.
    # _generate_noise), on the OS-seeded generator.
    dp_optimizer.secure_mode = True
    session = PrivateTraining(dp_model, dp_optimizer, dp_loader, plan)
    try:
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=dp_loader,
                max_physical_batch_size=max_physical_batch_size,
                optimizer=dp_optimizer,
            ) as physical_loader,
        ):
            # Opacus's hooks on the first layer trigger this torch notice on every step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            session.loader = physical_loader
            yield session
    finally:
        new_history = [list(h) for h in engine.accountant.history]
        plans = dict(entry.get("plans", {}))
        plans[str(run_id)] = plan.noise_multiplier
        ledger.update(
            key,
            {
                "history": new_history,
                "plans": plans,
                "accountant": plan.accountant,
                "delta": plan.delta,
            },
        )
        session.epsilon = epsilon_of(
            [tuple(h) for h in new_history],
            delta=plan.delta,
            accountant=plan.accountant,
        )
        if isinstance(dp_model, GradSampleModule):
            dp_model.remove_hooks()
