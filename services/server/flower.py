"""Where the server's Flower run is put together and started: the connected clients
(``connected``), Bouquet's strategy (``strategy``) and the round loop (``rounds``) on Flower's
gRPC server, with TLS when set."""

from __future__ import annotations

import numpy as np

from flwr.server import ServerConfig, start_server
from flwr.server.client_manager import SimpleClientManager

from services import tls
from services.server.central import CentralEvaluator
from services.server.connected import ConnectedClients
from services.server.membership import Membership
from services.server.results import RoundRecorder, RunState
from services.server.rounds import RecordingServer
from services.server.strategy import BouquetStrategy
from services.settings import ServerSettings
from services.taskspec import TaskSpec


def run(
    settings: ServerSettings, spec: TaskSpec, state: RunState, recorder: RoundRecorder, evaluator: CentralEvaluator, membership: Membership,
    central_evaluation: bool, resume_from: list[np.ndarray] | None = None,
) -> None:
    """Serve the rounds after the last recorded one; returns when the last is recorded, raises
    what ended the run early."""
    client_manager = SimpleClientManager()
    clients = ConnectedClients(client_manager, settings.join_token, on_refused=recorder.join_refused)
    strategy = BouquetStrategy(
        spec=spec,
        settings=settings,
        membership=membership,
        clients=clients,
        recorder=recorder,
        evaluator=evaluator,
        central_evaluation=central_evaluation,
        resume_from=resume_from,
    )
    first_round = recorder.rounds[-1]["round"] + 1 if recorder.rounds else 1
    server = RecordingServer(client_manager=client_manager, strategy=strategy, state=state, first_round=first_round)
    try:
        start_server(
            server_address=settings.listen_address,
            server=server,
            # No fixed round timeout: RecordingServer gives every round the job budget (services.budget).
            config=ServerConfig(num_rounds=settings.rounds, round_timeout=None),
            certificates=tls.server_files(settings.tls_dir).for_flower() if settings.tls_dir else None,
        )
    finally:
        clients.close()
    if server.error is not None:
        raise server.error
