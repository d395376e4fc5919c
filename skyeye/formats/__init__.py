"""The shared vocabulary, free of torch and MLflow: task identifiers and prompts
(`prompts`), box text (`boxes`), the benchmarks, splits and metric names
(`benchmarks`), the metrics themselves (`metrics`) and how files are written (`files`)."""
