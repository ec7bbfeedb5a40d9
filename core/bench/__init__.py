"""Benchmark: AnoMem beside peer detectors, on the same data and the same metrics."""
