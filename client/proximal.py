"""FedProx's proximal term as a loss wrapper (Li et al., MLSys 2020, eq. 2).

The site minimises ``h(w) = F(w) + (mu / 2) ||w - w_t||^2`` where ``w_t`` is the global
model received this round. :class:`ProximalLoss` wraps the task's loss so the training
loop (client/train.py ``train_epochs``) stays the same with and without FedProx (DESIGN
section 9, rule 7). The server's ``FedProx`` strategy sends ``mu`` as ``proximal-mu`` in
every train message's config.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError


class ProximalLoss(nn.Module):
    """``base(outputs, targets) + (mu / 2) * sum_p ||p - p_global||^2``.

    Parameters
    ----------
    base : torch.nn.Module
        The task's loss ``(outputs, targets) -> scalar``.
    model : torch.nn.Module
        The model being trained; its current parameters are the anchor ``w_t`` (copied,
        detached), so build this right after loading the global weights.
    mu : float
        Proximal weight, >= 0 (0 leaves ``base`` unchanged).

    Raises
    ------
    ConfigError
        If ``mu`` is negative.

    """

    def __init__(self, base: nn.Module, *, model: nn.Module, mu: float) -> None:
        super().__init__()
        if mu < 0:
            raise ConfigError(f"proximal mu must be >= 0, got {mu}; set strategy-args.proximal-mu")
        self.base = base
        self.mu = float(mu)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params]

    def penalty(self) -> torch.Tensor:
        """Return ``(mu / 2) * ||w - w_t||^2`` (a scalar tensor with gradient)."""
        total = torch.zeros((), device=self._anchor[0].device if self._anchor else None)
        for p, a in zip(self._params, self._anchor, strict=True):
            total = total + torch.sum((p - a) ** 2)
        return 0.5 * self.mu * total

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the base loss plus the proximal penalty."""
        out: torch.Tensor = self.base(outputs, targets) + self.penalty()
        return out
