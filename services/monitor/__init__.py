"""The memory monitor (``python -m services.monitor``, compose service ``gpu-monitor``).

It samples GPU memory through NVML (or, without a GPU, the RSS of the run's processes),
attributes every process to its replica and every sample to a round, and writes
``memory.csv`` and ``memory_summary.json`` into the run folder: the evidence that memory
goes back to baseline after every round, or the pointer to where it did not.
"""
