"""Researcher tooling: public datasets, partitioners, virtual sites, the simulation driver.

Subpackages by concern: :mod:`simulation.data` (public datasets, partitioners, virtual site
datasets, hospital data preparation), :mod:`simulation.launch` (the Flower simulation engine
and the local deployment), :mod:`simulation.research` (experiments, pooled and local
baselines, summaries, reports). The modules at this level are the ``medfed`` commands
(registered through the ``medfed.commands`` entry points in pyproject.toml).

Nothing here runs inside a Flower app and the FAB does not ship it (pyproject.toml
``fab-include``); production code (common, client, server) never imports it.
"""
