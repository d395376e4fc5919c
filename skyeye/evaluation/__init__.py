"""Evaluation on the 8 benchmarks: the model's answers (`predictors`), the trivial
baselines (`baselines`), the run that scores them (`runner`), the report (`report`) and
the paper's published figures (`paper`)."""
