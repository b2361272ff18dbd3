"""GRU / LSTM sequence classifiers with Opacus's DP recurrent layers.

An image ``(N, 1, H, W)`` is read row by row as a sequence of ``H`` steps of ``W``
features (row-sequential "pixel-row" reading as in the sequential-MNIST benchmarks;
Le et al., 2015), so the classification site datasets of the main job feed them
unchanged.

Under DP-SGD the recurrent layers are built from Opacus's own DP building blocks so
that Opacus computes every per-sample gradient with its registered grad samplers:

- GRU: :class:`DPRowGRU`, Opacus's ``DPGRUCell`` arithmetic with the input projection
  of all time steps hoisted out of the time loop into one ``nn.Linear`` (the standard
  RNN optimisation, Appleyard et al., "Optimizing Performance of Recurrent Neural
  Networks on GPUs", 2016). Only the recurrent projection stays an ``RNNLinear`` called
  once per step. ``opacus.layers.DPGRU`` calls two ``RNNLinear`` per step and
  materialises a per-sample gradient for each call: 4.4x ``torch.nn.GRU``'s step time
  on CPU here against about 3.7x for this layer (bench/dp_overhead.py).
- LSTM: ``opacus.layers.DPLSTM``.

Both keep the parameter names of ``torch.nn.GRU`` / ``LSTM`` (``weight_ih_l0`` ...) in
their state dicts, so a model moves between the DP layer and the plain one.
``dp_layers=False`` builds the same model with ``torch.nn.GRU`` / ``LSTM`` (non-DP
baseline of bench/dp_overhead.py; not trainable under DP-SGD).
"""

from __future__ import annotations

from typing import Any

import opacus  # noqa: F401  (first: see below)
import torch
from opacus.layers import DPLSTM
from opacus.layers.dp_rnn import RNNLinear
from torch import nn

from common.errors import ConfigError

# ``import opacus`` must come before ``from opacus.layers import ...``: the latter takes
# the import lock of ``opacus.layers`` before initialising ``opacus``, whose own import
# needs ``opacus.layers.dp_rnn``. When the ServerApp (building the model) and a ClientApp
# (importing Opacus) import concurrently in one simulation process, that order makes
# Python's deadlock detection hand out a half-initialised module (ImportError
# "cannot import name 'RNNLinear' from partially initialized module").

CELLS = ("gru", "lstm")

#: DPRowGRU's internal parameter names -> torch.nn.GRU's (one layer, one direction).
_GRU_PUBLIC_NAMES = {
    "ih.weight": "weight_ih_l0",
    "ih.bias": "bias_ih_l0",
    "hh.weight": "weight_hh_l0",
    "hh.bias": "bias_hh_l0",
}


class DPRowGRU(nn.Module):
    """One-layer, batch-first GRU whose per-sample gradients Opacus computes.

    Same function and parameters as ``torch.nn.GRU(input_size, hidden_size,
    batch_first=True)`` (gates r, z, n in that order, PyTorch's initialisation):

    ``r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)``,
    ``z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``
    (Cho et al., 2014; the formulation of ``torch.nn.GRU`` and ``opacus.layers.DPGRUCell``).

    ``ih`` (``torch.nn.Linear``) maps all ``T`` inputs at once, so Opacus's linear grad
    sampler sums their contributions in one contraction. ``hh`` is Opacus's ``RNNLinear``,
    called once per step, whose grad sampler accumulates the per-step contributions.

    Parameters
    ----------
    input_size : int
        Features per step ``I``.
    hidden_size : int
        Hidden units ``H``.

    Notes
    -----
    Input ``(N, T, I)``; returns ``(output (N, T, H), h_T (1, N, H))`` like
    ``torch.nn.GRU``. The state dict uses ``torch.nn.GRU``'s names (``weight_ih_l0``,
    ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``) and loads either naming.

    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = RNNLinear(hidden_size, 3 * hidden_size)
        bound = hidden_size**-0.5  # torch.nn.GRU: U(-1/sqrt(H), 1/sqrt(H)) for all
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.register_state_dict_post_hook(_gru_public_names)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_gru_internal_names)  # type: ignore[no-untyped-call]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the recurrence over ``x`` ``(N, T, I)``; see the class notes for shapes."""
        n, steps, _ = x.shape
        gates_x = self.ih(x)  # (N, T, 3H): every step's input projection at once
        h = x.new_zeros(n, self.hidden_size)
        outputs = []
        two_h = 2 * self.hidden_size
        for t in range(steps):
            gx, gh = gates_x[:, t], self.hh(h)
            r, z = torch.sigmoid(gx[:, :two_h] + gh[:, :two_h]).chunk(2, dim=1)
            cand = torch.tanh(gx[:, two_h:] + r * gh[:, two_h:])
            h = cand + z * (h - cand)  # = (1 - z) * cand + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1), h.unsqueeze(0)


def _gru_public_names(
    module: DPRowGRU, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for internal, public in _GRU_PUBLIC_NAMES.items():
        if f"{prefix}{internal}" in state_dict:
            state_dict[f"{prefix}{public}"] = state_dict.pop(f"{prefix}{internal}")


def _gru_internal_names(
    module: DPRowGRU, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    for internal, public in _GRU_PUBLIC_NAMES.items():
        if f"{prefix}{public}" in state_dict:
            state_dict[f"{prefix}{internal}"] = state_dict.pop(f"{prefix}{public}")


class RowSequenceClassifier(nn.Module):
    """Recurrent classifier over image rows: RNN, last hidden state, linear head.

    Parameters
    ----------
    cell : str
        ``"gru"`` or ``"lstm"``.
    input_size : int
        Features per step ``W`` (image width x channels).
    num_classes : int
        Output logits ``K``.
    hidden_size : int
        RNN hidden units.
    num_layers : int
        Stacked RNN layers.
    dp_layers : bool
        DP-SGD-ready layers (default: :class:`DPRowGRU` / Opacus ``DPLSTM``) or
        ``torch.nn.GRU`` / ``LSTM``.

    Raises
    ------
    ConfigError
        Unknown ``cell`` or non-positive sizes.

    Notes
    -----
    Input float32 ``(N, C, H, W)`` in ``[0, 1]`` with ``C * W == input_size``; output
    float32 logits ``(N, K)``.

    """

    def __init__(
        self,
        *,
        cell: str,
        input_size: int = 28,
        num_classes: int = 2,
        hidden_size: int = 64,
        num_layers: int = 1,
        dp_layers: bool = True,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ConfigError(f"RNN cell={cell!r} must be one of {list(CELLS)}")
        if min(input_size, num_classes, hidden_size, num_layers) < 1:
            raise ConfigError("RNN input_size, num_classes, hidden_size, num_layers must be >= 1")
        self.rnn: nn.Module
        if dp_layers and cell == "gru":
            if num_layers != 1:
                raise ConfigError("the DP GRU has one layer; use num_layers=1")
            self.rnn = DPRowGRU(input_size, hidden_size)
        else:
            plain: dict[str, type[nn.Module]] = {"gru": nn.GRU, "lstm": nn.LSTM}
            layer = DPLSTM if dp_layers else plain[cell]
            self.rnn = layer(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        # Opacus's DPLSTM exposes nn.LSTM's names (weight_ih_l0 ...) as aliases of its
        # submodules' parameters (l0.ih.weight ...), but its filter of the internal
        # names ignores the prefix of a nested module, so both would appear in our
        # state_dict. Keep only the nn.LSTM names (what travels to the server) and
        # accept them on load. (DPRowGRU renames its own.)
        aliases: dict[str, str] = dict(getattr(self.rnn, "old_to_new", {}))
        self._rnn_aliases = aliases
        self.register_state_dict_post_hook(_drop_internal_names)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_add_internal_names)  # type: ignore[no-untyped-call]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to ``(N, K)`` logits, reading ``H`` rows as time steps."""
        n, c, h, w = x.shape
        seq = ((x - 0.5) / 0.25).permute(0, 2, 1, 3).reshape(n, h, c * w)
        out, _ = self.rnn(seq)
        logits: torch.Tensor = self.head(out[:, -1])
        return logits


def _drop_internal_names(
    module: RowSequenceClassifier, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for internal in module._rnn_aliases:
        state_dict.pop(f"{prefix}rnn.{internal}", None)


def _add_internal_names(
    module: RowSequenceClassifier, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    for internal, public in module._rnn_aliases.items():
        key = f"{prefix}rnn.{public}"
        if key in state_dict:
            state_dict[f"{prefix}rnn.{internal}"] = state_dict[key]


def build_gru(*, num_classes: int = 2, hidden_size: int = 64, dp_layers: bool = True) -> nn.Module:
    """Registry factory: GRU over the 28 rows of a 28 x 28 image."""
    return RowSequenceClassifier(
        cell="gru", num_classes=num_classes, hidden_size=hidden_size, dp_layers=dp_layers
    )


def build_lstm(*, num_classes: int = 2, hidden_size: int = 64, dp_layers: bool = True) -> nn.Module:
    """Registry factory: LSTM over the 28 rows of a 28 x 28 image."""
    return RowSequenceClassifier(
        cell="lstm", num_classes=num_classes, hidden_size=hidden_size, dp_layers=dp_layers
    )
