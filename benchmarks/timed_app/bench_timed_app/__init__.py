"""The benchmarked Flower App's timing probes (benchmarks/appmode.py copies this package beside the app's own)."""
