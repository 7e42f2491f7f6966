from pathlib import Path

import pytest
import torch

from tests.helpers.cli import train_teacher


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A teacher trained for a few steps with configs/teacher.yaml (once per session)."""
    return train_teacher(tmp_path_factory.mktemp("teacher"))
