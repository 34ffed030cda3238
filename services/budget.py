"""One time budget per client job, known to both sides, so the server's deadline for a round
follows from what an honest client may need.

A client's job first waits for a worker slot (services.admission: a GPU has one slot until a
worker measured its need, so a round's jobs may queue one behind the other), then runs for at
most FL_WORKER_TIMEOUT, and after a CUDA out-of-memory runs once more, again after waiting for
its slot. The server sends the wait's bound with every round (``protocol.SLOT_WAIT_TIMEOUT``),
the client bounds its worker by it, and the server gives the round the whole budget plus a
margin for starting workers and moving the weights. An honest client queued for a slot is
therefore never cut off, and one that does not answer within the budget is recorded as
``timed out after N s``.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSFER_MARGIN_S = 30.0  # worker start, the weights' transfer both ways, the client's own bookkeeping


@dataclass(frozen=True)
class JobBudget:
    job_s: float  # FL_WORKER_TIMEOUT: the job itself, from when its worker holds a slot
    slot_wait_s: float  # the longest wait for a slot

    @classmethod
    def for_round(cls, worker_timeout: float, jobs: int) -> JobBudget:
        """``jobs``: the most jobs a round has (one per partition). Ahead of a job in the queue:
        every other job of the round and one more (the server's evaluation worker, or another
        run's on the same host), each at its limit."""
        return cls(job_s=worker_timeout, slot_wait_s=max(1, jobs) * worker_timeout)

    @property
    def client_s(self) -> float:
        """The most an honest client spends on one job: the job and its one retry, each after its wait."""
        return 2 * (self.slot_wait_s + self.job_s)

    @property
    def deadline_s(self) -> float:
        """The server's deadline for a client's answer in a round."""
        return self.client_s + TRANSFER_MARGIN_S

    def describe(self) -> str:
        return (
            f"2 x ({self.slot_wait_s:g} s slot wait + {self.job_s:g} s job (FL_WORKER_TIMEOUT)) "
            f"+ {TRANSFER_MARGIN_S:g} s: the job and its one retry"
        )
