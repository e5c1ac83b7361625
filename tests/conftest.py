import os
import sys
from pathlib import Path

# One intra-op thread for the tests and every subprocess they start: the models here are tiny, and on a
# shared 2-core machine a second OpenMP thread that gets descheduled makes every op spin-wait (100x
# slower steps were measured with a busy neighbour).
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
# Tests import their helpers (hf_models, reference_v1) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


# ------------------------------------------------------------------------------------------------ devices
# DSMOE_TEST_DEVICE=cuda (or cuda:N) runs the device-agnostic tests (those taking the `device` fixture)
# on that GPU; unset, they run on the CPU. Tests marked `cuda` run only when it names a CUDA device.
import pytest  # noqa: E402

TEST_DEVICE = os.environ.get("DSMOE_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs DSMOE_TEST_DEVICE=cuda and a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "device: takes the `device` fixture (set automatically); "
                            "`-m 'device or cuda'` is the GPU subset scripts/gpu_check.sh runs")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
    if TEST_DEVICE.startswith("cuda") and torch.cuda.is_available():
        return
    why = ("set DSMOE_TEST_DEVICE=cuda to run" if not TEST_DEVICE.startswith("cuda")
           else f"DSMOE_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def device() -> torch.device:
    """The device the device-agnostic tests run on: DSMOE_TEST_DEVICE (default cpu)."""
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"DSMOE_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA GPU")
    return torch.device(TEST_DEVICE)
