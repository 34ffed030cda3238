"""ServerApp: FedAvg over every connected node, central evaluation on the held-out split
(Flower's quickstart-pytorch shape)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart_app.task import Net, load_centralized_dataset
from quickstart_app.task import test as test_fn

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the FedAvg rounds; print the final accuracy and save the final model (in Bouquet:
    in the run folder's ``serverapp/``, the ServerApp's working folder)."""
    num_rounds = int(context.run_config["num-server-rounds"])
    strategy = FedAvg(fraction_evaluate=float(context.run_config["fraction-evaluate"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": float(context.run_config["learning-rate"])}),
        evaluate_fn=central_evaluate,
    )
    final = result.evaluate_metrics_serverapp.get(num_rounds, {})
    print(f"final central accuracy: {final.get('accuracy')}")
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate the global model on the held-out test split (on the CPU unless the ServerApp is given a GPU)."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    loss, accuracy = test_fn(model, load_centralized_dataset(), device)
    return MetricRecord({"accuracy": accuracy, "loss": loss})
