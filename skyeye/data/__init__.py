"""Benchmark data: the typed record model and the readers of the 8 native layouts."""
from skyeye.data.readers import BENCHMARKS, SCORED_SPLITS, SPLITS, detect_benchmark, read_benchmark
from skyeye.data.records import (
    CaptionSample,
    DataFormatError,
    GroundingSample,
    ReadReport,
    Sample,
    VQASample,
)

__all__ = [
    "BENCHMARKS", "SCORED_SPLITS", "SPLITS", "detect_benchmark", "read_benchmark",
    "CaptionSample", "DataFormatError", "GroundingSample", "ReadReport", "Sample", "VQASample",
]
