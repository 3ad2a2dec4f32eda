import os

import pytest
import torch

from proper_fed.model.backbone import cache_root, use_cache_dir

use_cache_dir(cache_root(os.environ))  # the test process is an edge too: $PROPER_FED_CACHE as CI sets it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_backbone():
    from proper_fed.config import BackboneConfig
    from proper_fed.model.backbone import load_backbone

    return load_backbone(BackboneConfig(model="tiny", device="cpu", dtype="fp32"))
