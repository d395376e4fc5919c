"""The audit: from a registered version down to its data, and from a data version up to
every model trained on it, read from MLflow, git and DVC only. `chain` follows the
links, `reader` does the lookups, `records` holds what is reported."""
