"""Sharded evaluation: each rank scores a slice of the test set, then one reduction."""

from __future__ import annotations

import torch

from hpcdl.comm import Communicator
from hpcdl.data import Dataset
from hpcdl.models import count_correct, loss_function


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, comm: Communicator, *,
             batch_size: int = 512) -> tuple[float, float | None]:
    """Return (test_loss, test_accuracy) over the whole test set, identical on every rank.

    Rank r scores test samples r, r+N, r+2N, ... The loss is the mean over
    samples (over tokens for language models). Accuracy is None for regression.
    """
    was_training = model.training
    model.eval()
    loss_fn = loss_function(data.task)
    indices = torch.arange(comm.rank, len(data.x_test), comm.size)
    loss_sum = 0.0
    correct = 0
    counted = 0
    samples = 0
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        x, y = data.x_test[batch], data.y_test[batch]
        output = model(x)
        if data.task == "regression":
            loss_sum += float(loss_fn(output, y)) * len(batch)
            samples += len(batch)
        else:
            hits, total = count_correct(output, y, data.task)
            loss_sum += float(loss_fn(output, y)) * total
            correct += hits
            counted += total
    model.train(was_training)

    totals = comm.allreduce_scalars([loss_sum, correct, counted, samples])
    loss_sum, correct, counted, samples = (float(v) for v in totals)
    if data.task == "regression":
        return loss_sum / max(samples, 1.0), None
    return loss_sum / max(counted, 1.0), correct / max(counted, 1.0)
