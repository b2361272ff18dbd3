"""Differential privacy at the site: Opacus DP-SGD and the site's own privacy ledger.

Privacy model (DESIGN section 5):

- Every site trains with DP-SGD (Abadi et al., CCS 2016) through Opacus
  (``PrivacyEngine.make_private``: Poisson sampling, per-sample clipping to
  ``dp.max-grad-norm``, Gaussian noise ``noise_multiplier * C``, ``grad_sample_mode=
  "hooks"``) and ``BatchMemoryManager`` so a logical batch is split into physical
  batches that fit memory.
- The site owns its privacy ledger (:class:`PrivacyLedger`): the accountant history
  ``[(noise_multiplier, sample_rate, steps), ...]`` per dataset fingerprint
  (:func:`ledger_key`; whatever the coordinator calls the project), in
  ``<state-dir>/privacy-ledger.json``, authenticated with HMAC-SHA256 under a site-local
  key (``cryptography``), written atomically, and anchored in the site's hash-chained
  audit log (:mod:`client.site.audit`): every write appends its write counter and the
  SHA-256 of the file, every read requires the ledger to match the last anchor. The
  ledger is read before and written after every round, under an exclusive file lock
  held for the whole round. Only a brand-new state dir starts at zero; a corrupt,
  tampered, rolled-back, replaced or deleted ledger makes the site refuse to train until
  the hospital restores it or resets it explicitly (``medfed budget reset``).
- Before a round the site computes the epsilon its planned steps would reach
  (accountant over the ledger history plus the planned steps) and refuses with
  :class:`PrivacyBudgetError` if that crosses its ceiling ``max-epsilon`` (the site
  policy, set by the hospital; client/site/policy.py).
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
import fcntl
import hashlib
import hmac as std_hmac
import json
import logging
import os
import secrets
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from torch import nn
from torch.utils.data import DataLoader

from client.site.audit import AuditChainError, AuditLog
from common.errors import MedfedError
from common.fsutil import create_private, fsync_dir, open_private, private_mkdir

# Opacus is imported inside the functions that use it ("lazy Opacus import"): with
# SciPy it takes ~1.5 s, and under the deployment engine every Flower message runs in a
# fresh ClientApp process, so an evaluate message should not pay for it.

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
KEY_FILE = "privacy-ledger.key"
PENDING_FILE = "privacy-ledger.json.pending"
LOCK_FILE = ".privacy-ledger.lock"
FORMAT = "medfed-privacy-ledger"
VERSION = 2
LEGACY_VERSION = 1
ANCHOR_EVENT = "ledger"
RESET_EVENT = "ledger-reset"

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class DPRandomness:
    """The generators one DP round samples batches, draws noise and augments from.

    Build it with :meth:`secret` (every real round) or :meth:`seeded` (simulation
    research only, NOT PRIVATE); never from a seed in run config.

    Attributes
    ----------
    sampling : torch.Generator
        CPU generator for Opacus's Poisson sampling (``UniformWithReplacementSampler``).
    noise : torch.Generator
        Generator on the training device for the Gaussian noise of ``DPOptimizer``.
    augmentation : torch.Generator
        Generator on the training device for training-time augmentation (run config
        ``augment``, client/augment.py).
    reproducible : bool
        True when all were seeded from a known seed: the noise is then predictable by
        whoever knows that seed and gives no differential privacy against them.
    """

    sampling: torch.Generator
    noise: torch.Generator
    reproducible: bool
    augmentation: torch.Generator

    @classmethod
    def secret(cls, device: torch.device) -> DPRandomness:
        """Seed every generator with 64 bits each from the OS CSPRNG (``os.urandom``).

        Called once per round at the site, so no two rounds (or runs) share a draw.
        torch's CPU generator is MT19937 and its CUDA generator Philox; both take a
        64-bit seed, so an attacker who sees only aggregated, noised updates would have
        to search 2**64 seeds per generator and round.
        """
        return cls(
            sampling=torch.Generator().manual_seed(secrets.randbits(64)),
            noise=torch.Generator(device=device).manual_seed(secrets.randbits(64)),
            reproducible=False,
            augmentation=torch.Generator(device=device).manual_seed(secrets.randbits(64)),
        )

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> DPRandomness:
        """Build generators from a known ``seed``: simulation research only, NOT PRIVATE.

        Parameters
        ----------
        seed : int
            Any integer; the noise generator uses ``seed + 7``, augmentation ``seed + 13``.
        device : torch.device
            Device of the noise and augmentation generators (the training device).
        """
        log.warning(
            "dp.reproducible-noise: DP noise and sampling are seeded from the run config; "
            "this run is NOT PRIVATE against anyone who knows the seed (simulation only)"
        )
        return cls(
            sampling=torch.Generator().manual_seed(seed),  # reproducible: simulation only
            noise=torch.Generator(device=device).manual_seed(seed + 7),  # reproducible too
            reproducible=True,
            augmentation=torch.Generator(device=device).manual_seed(seed + 13),  # likewise
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


def ledger_key(dataset_fingerprint: str) -> str:
    """Ledger entry key: the site dataset's fingerprint, and nothing the coordinator names.

    The budget is per site (one ledger per state dir) and per dataset, whatever the
    project or run is called: a new project name must not restart it at zero.

    Raises
    ------
    PrivacyError
        If the fingerprint is empty or holds a ``/`` (legacy ``project/dataset`` keys).
    """
    if not dataset_fingerprint or "/" in dataset_fingerprint:
        raise PrivacyError(
            f"dataset fingerprint {dataset_fingerprint!r} is empty or holds '/'; pass the "
            "site dataset's fingerprint"
        )
    return dataset_fingerprint


def _merge_legacy(entries: dict[str, Any]) -> dict[str, Any]:
    """Fold version-1 ``project/dataset`` entries into one entry per dataset.

    Histories are concatenated (sequential composition: the accountant composes them),
    plans are merged per run id, and the smallest delta is kept.
    """
    merged: dict[str, Any] = {}
    for key, entry in sorted(entries.items()):
        dataset = key.rpartition("/")[2]
        into = merged.setdefault(
            dataset, {"history": [], "plans": {}, "accountant": entry.get("accountant", "rdp")}
        )
        into["history"].extend(entry.get("history", []))
        for run_id, sigma in entry.get("plans", {}).items():
            into["plans"].setdefault(run_id, sigma)
        if "delta" in entry:
            into["delta"] = min(float(entry["delta"]), float(into.get("delta", 1.0)))
        if entry.get("updated", "") > into.get("updated", ""):
            into["updated"] = entry["updated"]
    return merged


_REMEDY = (
    "Restore the privacy ledger and the audit log that belong together (from the same "
    "backup), or, if the hospital accepts restarting this dataset's budget at zero, run "
    "`medfed budget reset STATE_DIR --dataset FINGERPRINT --yes-i-understand`."
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PrivacyLedger:
    """The site's persistent, authenticated, anchored record of privacy spent.

    ``<state_dir>/privacy-ledger.json`` holds ``{"format", "version", "seq", "entries",
    "mac"}``: the accountant history per :func:`ledger_key`, a write counter ``seq`` that
    grows by one with every write, and an HMAC-SHA256 over the rest under the site-local
    key ``privacy-ledger.key``. Every write also appends an audit entry ``event="ledger"``
    with that ``seq`` and the SHA-256 of the ledger file's bytes to the site's audit log
    (:class:`client.site.audit.AuditLog`, same state dir). Every read checks the HMAC,
    verifies the audit chain, and requires the ledger's ``(seq, sha256)`` to equal the
    last ``ledger`` anchor: an older, validly signed copy (rolled back), a ledger and
    key copied from another site (replaced) or a missing ledger whose key or anchors
    remain (deleted) are refused, never reset. A brand-new state dir (no key, no ledger,
    no anchor) starts at zero.

    Writes are crash-safe: the new ledger goes to ``privacy-ledger.json.pending``, is
    anchored, then renamed into place; a read that finds an anchored pending file
    completes the rename. Every read and write holds an exclusive ``flock`` on
    ``.privacy-ledger.lock``; :meth:`lock` holds it across a whole round (re-entrant
    within this object), so rounds on one state dir are serialised.

    A version-1 ledger (keyed ``project/dataset``, no ``seq``) is read only while the
    audit log holds no ledger anchor; its entries are merged per dataset and the next
    write anchors it.

    Error messages never hold paths (they may reach the coordinator): paths go to this
    site's log only.

    Parameters
    ----------
    state_dir : pathlib.Path
        The site's state directory (node config ``state-dir``); created on first write.

    Raises
    ------
    PrivacyError
        On read: a ledger that is not valid JSON, has an unknown format, fails its HMAC
        check, exists without its key, does not match its audit anchor, or is missing
        while its key or anchors exist; or an audit log that fails verification.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.key_path = self.state_dir / KEY_FILE
        self.pending_path = self.state_dir / PENDING_FILE
        self.lock_path = self.state_dir / LOCK_FILE
        self.audit = AuditLog(self.state_dir)
        self._mutex = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    # -------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the ledger's exclusive file lock (re-entrant within this object).

        Other processes, and other :class:`PrivacyLedger` objects in this one, wait
        until it is released.

        Raises
        ------
        PrivacyError
            If the lock file cannot be opened (e.g. no access to the state dir).
        """
        with self._mutex:
            if self._depth == 0:
                try:
                    private_mkdir(self.state_dir)
                    fd = open_private(self.lock_path, os.O_RDWR)
                except OSError as exc:
                    log.error("cannot lock the privacy ledger in %s: %s", self.state_dir, exc)
                    raise PrivacyError(
                        "cannot lock the privacy ledger in this site's state dir "
                        f"({type(exc).__name__}); the site refuses to train"
                    ) from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    # ------------------------------------------------------------------ key + MAC
    def _key(self, *, create: bool) -> bytes:
        if self.key_path.is_file():
            key = self.key_path.read_bytes()
            if len(key) != 32:
                log.error("privacy ledger key %s is not 32 bytes", self.key_path)
                raise PrivacyError(
                    "the privacy ledger's key in this site's state dir is not 32 bytes; the "
                    "site refuses to train. Restore the key from backup."
                )
            return key
        if not create:
            raise PrivacyError(
                "the privacy ledger in this site's state dir exists but its key "
                f"({KEY_FILE}) is missing: the ledger cannot be verified, so the site "
                "refuses to train. Restore the key from backup."
            )
        private_mkdir(self.state_dir)
        key = os.urandom(32)  # OS CSPRNG
        with create_private(self.key_path) as fh:  # 0600 whatever the umask
            fh.write(key)
        return key

    @staticmethod
    def _mac(key: bytes, body: dict[str, Any]) -> str:
        h = crypto_hmac.HMAC(key, hashes.SHA256())
        h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        return h.finalize().hex()

    def _signed(self, raw: bytes) -> tuple[int, int, dict[str, Any]]:
        """Check the HMAC of ledger bytes; return ``(version, seq, entries)``."""
        try:
            doc = json.loads(raw)
            mac = doc.pop("mac")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            log.error("privacy ledger %s is corrupt: %s", self.path, exc)
            raise PrivacyError(
                "the privacy ledger in this site's state dir is corrupt "
                f"({type(exc).__name__}); the site refuses to train rather than reset its "
                "budget. Restore it from backup."
            ) from None
        expected = self._mac(self._key(create=False), doc)
        if not std_hmac.compare_digest(str(mac), expected):
            log.error("privacy ledger %s fails its HMAC check", self.path)
            raise PrivacyError(
                "the privacy ledger in this site's state dir fails its integrity check "
                "(edited or tampered); the site refuses to train. Restore it from backup."
            )
        version = doc.get("version")
        if doc.get("format") != FORMAT or version not in (LEGACY_VERSION, VERSION):
            raise PrivacyError(
                "the privacy ledger in this site's state dir has an unknown format/version; "
                "the site refuses to train"
            )
        if version == LEGACY_VERSION:
            return LEGACY_VERSION, 0, _merge_legacy(doc["entries"])
        return VERSION, int(doc["seq"]), doc["entries"]

    # --------------------------------------------------------------- anchoring
    def _anchors(self) -> list[dict[str, Any]]:
        """Return the ``ledger`` entries of the verified audit log, oldest first."""
        try:
            return [e for e in self.audit.entries() if e["event"] == ANCHOR_EVENT]
        except AuditChainError as exc:
            log.error("audit log in %s fails verification: %s", self.state_dir, exc)
            raise PrivacyError(
                f"the audit log in this site's state dir fails verification ({exc}), so the "
                "privacy ledger cannot be checked against it; the site refuses to train. "
                "Restore the audit log from backup, or keep the damaged log aside as "
                "evidence and reset with `medfed budget reset STATE_DIR --dataset "
                "FINGERPRINT --yes-i-understand`."
            ) from None

    def _roll_forward(self, anchor: dict[str, Any] | None) -> None:
        """Finish a write interrupted after its anchor; drop one interrupted before."""
        if not self.pending_path.exists():
            return
        if anchor is not None and _sha256(self.pending_path.read_bytes()) == anchor["sha256"]:
            log.warning("completing an interrupted privacy ledger write in %s", self.state_dir)
            self.pending_path.replace(self.path)
            fsync_dir(self.state_dir)
        else:
            self.pending_path.unlink()

    def _load(self) -> tuple[int, dict[str, Any]]:
        """Return the verified ``(seq, entries)``; call with the lock held."""
        anchors = self._anchors()
        anchor = anchors[-1] if anchors else None
        self._roll_forward(anchor)
        if not self.path.exists():
            if anchor is None and not self.key_path.exists():
                return 0, {}  # a brand-new site
            log.error("privacy ledger %s is missing", self.path)
            raise PrivacyError(
                "the privacy ledger in this site's state dir was deleted (its key or its "
                "audit anchors remain); the site refuses to train rather than restart its "
                f"budget at zero. {_REMEDY}"
            )
        raw = self.path.read_bytes()
        version, seq, entries = self._signed(raw)
        if version == LEGACY_VERSION and anchor is None:
            log.warning("adopting a version-1 privacy ledger in %s", self.state_dir)
            return 0, entries
        if anchor is None or version == LEGACY_VERSION:
            log.error("privacy ledger %s has no matching audit anchor", self.path)
            raise PrivacyError(
                "the privacy ledger in this site's state dir was replaced: the site's audit "
                "log holds no record of it (a ledger and key copied from another site or "
                f"an older install); the site refuses to train. {_REMEDY}"
            )
        digest = _sha256(raw)
        if seq == anchor["ledger_seq"] and digest == anchor["sha256"]:
            return seq, entries
        log.error(
            "privacy ledger %s: seq %s, audit anchor seq %s", self.path, seq, anchor["ledger_seq"]
        )
        if any(a["sha256"] == digest for a in anchors):
            what = (
                f"rolled back to an older copy (write {seq}; the audit log records write "
                f"{anchor['ledger_seq']})"
            )
        else:
            what = (
                "replaced: it does not match the last write the audit log records (a ledger "
                "and key copied from another site, or the audit log was cut)"
            )
        raise PrivacyError(
            f"the privacy ledger in this site's state dir was {what}; the site refuses to "
            f"train. {_REMEDY}"
        )

    def _store(self, entries: dict[str, Any], seq: int, fields: dict[str, Any]) -> None:
        """Sign, anchor and atomically replace the ledger; call with the lock held."""
        body = {"format": FORMAT, "version": VERSION, "seq": seq, "entries": entries}
        doc = dict(body, mac=self._mac(self._key(create=True), body))
        raw = json.dumps(doc, indent=1, sort_keys=True).encode()
        self.pending_path.unlink(missing_ok=True)  # a fresh 0600 file, never an old mode
        with create_private(self.pending_path) as fh:  # flushed and fsync-ed on close
            fh.write(raw)
        self.audit.append(ANCHOR_EVENT, **fields, ledger_seq=seq, sha256=_sha256(raw))
        self.pending_path.replace(self.path)
        fsync_dir(self.state_dir)

    # ---------------------------------------------------------------- read / write
    def read(self) -> dict[str, Any]:
        """Return all entries (``{}`` for a brand-new site), after verification.

        Raises
        ------
        PrivacyError
            See the class docstring.
        """
        if not self.state_dir.is_dir():
            return {}
        with self.lock():
            return self._load()[1]

    def write(self, entries: dict[str, Any], **audit_fields: Any) -> None:
        """Replace the ledger with ``entries`` (after verifying the current one).

        Parameters
        ----------
        entries : dict
            All entries, keyed by :func:`ledger_key`.
        **audit_fields
            Extra fields for the ``ledger`` audit entry (no PHI, no paths).

        Raises
        ------
        PrivacyError
            If the current ledger fails verification; nothing is written.
        """
        with self.lock():
            seq, _ = self._load()
            self._store(entries, seq + 1, audit_fields)

    def entry(self, key: str) -> dict[str, Any]:
        """Return one entry (empty history when the dataset is new)."""
        return dict(self.read().get(key, {"history": [], "plans": {}}))

    def update(self, key: str, entry: dict[str, Any], **audit_fields: Any) -> None:
        """Replace one entry (read-verify-modify-write under the lock).

        ``audit_fields`` go into the ``ledger`` audit entry with ``dataset=key``.

        Raises
        ------
        PrivacyError
            As :meth:`write`.
        """
        with self.lock():
            seq, entries = self._load()
            entries[key] = dict(entry, updated=datetime.now(UTC).isoformat(timespec="seconds"))
            self._store(entries, seq + 1, {"dataset": key, **audit_fields})

    def reset(self, key: str) -> int:
        """Explicitly restart one dataset's budget at zero and re-anchor the ledger.

        The hospital's way out after a refused ledger (rolled back, replaced, deleted) or
        a deliberate reset. Other datasets' entries are kept as the ledger file holds
        them if its HMAC verifies (a missing ledger keeps none); the audit log records a
        ``ledger-reset`` entry with the steps dropped, then the new ``ledger`` anchor.

        Parameters
        ----------
        key : str
            The dataset's :func:`ledger_key`.

        Returns
        -------
        int
            Optimizer steps the dropped entry had recorded (0 if none).

        Raises
        ------
        PrivacyError
            If the audit log fails verification (move it aside first), or the ledger file
            exists but fails its HMAC check (move it aside first: every dataset then
            restarts at zero).
        """
        with self.lock():
            anchors = self._anchors()
            anchor = anchors[-1] if anchors else None
            if self.pending_path.exists():
                self.pending_path.unlink()
            entries: dict[str, Any] = {}
            seq = 0
            state = "missing"
            if self.path.exists():
                _, seq, entries = self._signed(self.path.read_bytes())
                state = "unanchored" if anchor is None else "anchored"
            dropped = entries.pop(key, {})
            steps = int(sum(h[2] for h in dropped.get("history", [])))
            new_seq = max(seq, int(anchor["ledger_seq"]) if anchor else 0) + 1
            self.audit.append(
                RESET_EVENT,
                dataset=key,
                dropped_steps=steps,
                ledger_found=state,
                kept_datasets=len(entries),
            )
            self._store(entries, new_seq, {"dataset": key, "reason": "reset"})
        log.warning(
            "privacy budget of dataset %s reset in %s (%d steps dropped)",
            key,
            self.state_dir,
            steps,
        )
        return steps


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
            f"max-epsilon={max_epsilon:g} (site policy); the site refuses to train"
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


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    plan: DPPlan,
    history: History,
    randomness: DPRandomness,
) -> tuple[Any, nn.Module, Any, DataLoader[Any]]:
    """Return Opacus's engine (its accountant holding ``history``) and the private objects."""
    from opacus import PrivacyEngine  # lazy Opacus import

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
        noise_generator=randomness.noise,  # DPRandomness: secrets-seeded every round
    )
    return engine, dp_model, dp_optimizer, dp_loader


def _record_spent(
    ledger: PrivacyLedger,
    key: str,
    entry: Mapping[str, Any],
    engine: Any,
    *,
    history: History,
    plan: DPPlan,
    run_id: int,
) -> float:
    """Write the accountant's history to the ledger; return the cumulative epsilon."""
    new_history = [list(h) for h in engine.accountant.history]
    plans = dict(entry.get("plans", {}))
    plans[str(run_id)] = plan.noise_multiplier
    epsilon = epsilon_of(
        [tuple(h) for h in new_history],
        delta=plan.delta,
        accountant=plan.accountant,
    )
    ledger.update(
        key,
        {
            "history": new_history,
            "plans": plans,
            "accountant": plan.accountant,
            "delta": plan.delta,
        },
        run_id=run_id,
        steps=int(sum(h[2] for h in new_history) - sum(h[2] for h in history)),
        epsilon=round(epsilon, 6),
        delta=plan.delta,
    )
    return epsilon


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
    training fails midway (steps taken have spent privacy). The ledger's exclusive lock
    (:meth:`PrivacyLedger.lock`) is held from the budget check to the record, so rounds
    on one state dir run one after the other and every step is recorded; the record
    appends a ``ledger`` entry (run id, steps, cumulative epsilon) to the audit log.

    Raises
    ------
    PrivacyBudgetError
        Before any training step, if the round would cross ``max_epsilon``.
    PrivacyError
        If the ledger is corrupt, tampered, rolled back, replaced or deleted, or the
        audit log fails verification.
    """
    # One round at a time per state dir: budget check, training and record under one
    # exclusive lock, so overlapping rounds neither lose steps nor both pass the check.
    with ledger.lock():
        entry = ledger.entry(key)
        history: History = [tuple(h) for h in entry.get("history", [])]
        check_budget(history, plan, max_epsilon=max_epsilon)

        from opacus import GradSampleModule  # lazy Opacus import
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        engine, dp_model, dp_optimizer, dp_loader = _make_private(
            model, optimizer, loader, plan=plan, history=history, randomness=randomness
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
            session.epsilon = _record_spent(
                ledger, key, entry, engine, history=history, plan=plan, run_id=run_id
            )
            if isinstance(dp_model, GradSampleModule):
                dp_model.remove_hooks()
