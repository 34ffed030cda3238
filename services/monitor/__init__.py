"""The memory monitor (``python -m services.monitor``, compose service ``gpu-monitor``).

It samples GPU memory through NVML (or, without a GPU, the PSS of the run's processes),
attributes every process to its replica and every sample to a round, and writes
``memory.csv``, ``memory_summary.json`` and ``report.html`` into the run folder: the evidence
that memory goes back to baseline after every round, or the pointer to where it did not.
"""
