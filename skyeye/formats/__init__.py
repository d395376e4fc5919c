"""The shared vocabulary, free of torch and MLflow: task identifiers and prompts
(`prompts`), box text (`boxes`), the benchmarks, splits and metric names
(`benchmarks`) and how files are written (`files`). The metrics themselves are
`skyeye.evaluation.metrics`, beside the per-item statistics they return."""
