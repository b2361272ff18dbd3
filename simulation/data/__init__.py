"""Data for virtual hospitals: public datasets, partitioners, virtual site datasets.

``datasets`` (MedMNIST download + checksum), ``partition`` (iid, Dirichlet, quantity-skew,
natural), ``sites`` (one site dataset per partition), ``chase`` and ``heart`` (CHASE_DB1 and
Fed-Heart-Disease preparation), ``export_dicom`` (synthetic DICOM exports for ``medfed ingest``).
"""
