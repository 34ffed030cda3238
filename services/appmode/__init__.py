"""App mode: a Flower App on Flower's Deployment Engine, every ClientApp message in Bouquet's worker.

``link`` (server side: settles the federation, runs ``flower-superlink``), ``node`` (one per
client replica: the warm process, the launch socket and its ``flower-supernode``),
``bin/flwr-clientapp`` (the launcher SuperExec starts by name for each message), ``launches``
(what the node does with one launch), ``clientapp`` (the job in the forked worker),
``refusal`` (a message the node cannot serve fails visibly), ``records`` (messages.jsonl),
``assignment`` (identity -> partition), ``submit`` (``flwr run`` and the run's real outcome),
``local`` (``scripts/run_local.py --app``), ``flower`` (Flower's programs and environment).
"""
