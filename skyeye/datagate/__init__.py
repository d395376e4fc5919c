"""The data layer's gate and versions: DVC data versions (`versioning`), the flattened
tables (`tables`) and Great Expectations checks (`expectations`) over the instruction and
evaluation files, and the gate as the platform runs it, recorded in MLflow (`gate`)."""
