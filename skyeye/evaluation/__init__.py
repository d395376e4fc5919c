"""Evaluation on the 8 benchmarks: the model's answers (`predictors`), the trivial
baselines (`baselines`), the metrics (`metrics`) with their per-item statistics and
bootstrap intervals (`intervals`), the run that scores them (`runner`) and its Ray workers
(`sharding`), the report (`report`) and the paper's published figures (`paper`)."""
