"""The site's data path: DICOM reading, de-identification checks, ingestion, torch datasets."""
