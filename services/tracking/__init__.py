"""Where researchers look at a run: MLflow, TensorBoard and Prometheus.

The run folder stays the source of truth: MLflow and TensorBoard are fed from its records
(metrics.jsonl, state.json, summary.json, memory_summary.json) by background threads that keep
their progress in ``tracking.json``, so a tracker that is down or slow never fails or slows the
federation, and what it missed is sent when it is back, at the end, or later by
``python -m services.tracking RUN_FOLDER``. Prometheus gets the round figures in memory, as the
server records each round. Nothing here imports torch.
"""
