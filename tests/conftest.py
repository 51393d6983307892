"""Shared test helpers."""

import os

import pytest
import torch

# Tests run on 2 cores next to other processes: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
