"""DeepSpeed's CPU shared-memory all-reduce leaves a ~70 MB /dev/shm buffer per rank per launch
(deepspeed_allreduce_buffer_*) and never removes it. Remove the ones these tests created."""

from __future__ import annotations

import glob
import os

import pytest

_PATTERN = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True, scope="session")
def _remove_leaked_deepspeed_shm():
    before = set(glob.glob(_PATTERN))
    yield
    for path in set(glob.glob(_PATTERN)) - before:
        try:
            os.remove(path)
        except OSError:
            pass
