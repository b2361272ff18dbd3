"""Shared vocabulary of medfed: configuration, models, records, the site-dataset contract.

`common` imports nothing from `client`, `server` or `simulation` (DESIGN section 2).
"""

__version__ = "0.1.0"
