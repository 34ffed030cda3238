"""Host-wide, memory-aware admission of workers to devices (GPUs, or the CPU).

A worker holds a slot on one device from before it touches CUDA until it exits. Slots are
``flock``-ed lock files in a folder every replica and the server share (a compose volume, or a
host folder locally), so the limit holds across containers and a killed worker's slot is freed
by the kernel at once. ``inventory`` says which devices exist and their free memory,
``slots`` is the locking, ``sizing`` how many slots a device has, ``gate`` admits a worker
(inside the fresh worker, before torch initialises CUDA) and ``retry`` runs a job again after a
CUDA out-of-memory.
"""
