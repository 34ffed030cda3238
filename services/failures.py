"""Why a worker job produced no result, as a type: the kind of failure, a one-line cause and the
traceback. The worker classifies, the client sends kind and cause to the server (services.protocol),
metrics.jsonl keeps them; nothing downstream parses the cause's text. Standard library only and
no Bouquet import: task.py (below the worker) and the worker share the one out-of-memory test.
"""

from __future__ import annotations

import enum


class Kind(str, enum.Enum):
    """The kinds of failure; the value is what logs and records show."""

    TASK_ERROR = "task error"  # the job (the task's code, or Bouquet's job around it) raised
    OUT_OF_MEMORY = "out of memory"  # a CUDA out-of-memory (services.admission.retry runs it once more)
    KILLED = "killed by signal"  # SIGKILL from the kernel's OOM killer, a user's kill, ...
    TIMED_OUT = "timed out"  # outlived its time (FL_WORKER_TIMEOUT) and was killed
    START_FAILED = "failed to start"  # no worker process could be started, or it died before answering

    def __str__(self) -> str:
        return self.value


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory, known by type name (torch.cuda.OutOfMemoryError) or by the message
    torch and the driver give (CUDA_ERROR_OUT_OF_MEMORY, cudaErrorMemoryAllocation); never imports
    torch to check the type. The host's MemoryError is not one (no GPU retry helps it)."""
    if isinstance(error, MemoryError):
        return False
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or any(mark in text for mark in ("out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation"))


def first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def classify(error: BaseException) -> tuple[Kind, str]:
    """(kind, one-line cause) of an exception a job raised."""
    name, line = type(error).__name__, first_line(error)
    if is_out_of_memory(error):
        return Kind.OUT_OF_MEMORY, f"out of GPU memory ({name}: {line})"
    return Kind.TASK_ERROR, f"{name}: {line}" if line else name
