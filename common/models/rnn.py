"""GRU / LSTM sequence classifiers with Opacus's DP recurrent layers.

An image ``(N, 1, H, W)`` is read row by row as a sequence of ``H`` steps of ``W``
features (row-sequential "pixel-row" reading as in the sequential-MNIST benchmarks;
Le et al., 2015), so the classification site datasets of the main job feed them
unchanged.

``opacus.layers.DPGRU`` / ``DPLSTM`` compute per-sample gradients with Opacus's hooks
and keep the parameter names of ``torch.nn.GRU`` / ``LSTM`` (``weight_ih_l0`` ...), so
a state dict moves between the DP layer and the plain one. ``dp_layers=False`` builds
the same model with ``torch.nn.GRU`` / ``LSTM`` (non-DP baseline of bench/dp_overhead.py;
not trainable under DP-SGD).
"""

from __future__ import annotations

from typing import Any

import opacus  # noqa: F401  (first: see below)
import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from common.errors import ConfigError

# ``import opacus`` must come before ``from opacus.layers import ...``: the latter takes
# the import lock of ``opacus.layers`` before initialising ``opacus``, whose own import
# needs ``opacus.layers.dp_rnn``. When the ServerApp (building the model) and a ClientApp
# (importing Opacus) import concurrently in one simulation process, that order makes
# Python's deadlock detection hand out a half-initialised module (ImportError
# "cannot import name 'RNNLinear' from partially initialized module").

CELLS = ("gru", "lstm")


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
        Use Opacus ``DPGRU`` / ``DPLSTM`` (default) or ``torch.nn.GRU`` / ``LSTM``.

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
        layer: type[nn.Module]
        if dp_layers:
            layer = DPGRU if cell == "gru" else DPLSTM
        else:
            layer = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = layer(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        # Opacus's DP layers expose nn.GRU/LSTM names (weight_ih_l0 ...) as aliases of
        # their submodules' parameters (l0.ih.weight ...), but its filter of the internal
        # names ignores the prefix of a nested module, so both would appear in our
        # state_dict. Keep only the nn.GRU/LSTM names (what travels to the server) and
        # accept them on load.
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
