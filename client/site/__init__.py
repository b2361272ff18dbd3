"""The site worker: the only medfed code at a hospital that touches patient data.

``medfed site serve`` runs it as a long-lived process the hospital installs and
configures; it alone reads the site dataset and holds the model code, Opacus, the
privacy ledger, the SecAgg+ keys, the site policy, the egress rules and the audit log
(DESIGN section 1, "Trust boundary"). In simulation the same service runs in-process.
"""
