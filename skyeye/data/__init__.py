"""Benchmark data: the typed record model, the readers of the 8 native layouts and the
instruction builder."""
from .readers import detect_benchmark, read_benchmark
from .records import CaptionSample, DataFormatError, GroundingSample, ReadReport, Sample, VQASample

__all__ = ["detect_benchmark", "read_benchmark",
           "CaptionSample", "DataFormatError", "GroundingSample", "ReadReport", "Sample", "VQASample"]
