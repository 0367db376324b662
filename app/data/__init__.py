"""Data manifests: the format (cases, checksums, folds), creating and validating them, and the datalists
that bundle configs train and validate on."""
