"""Server stages 1 and 2 trained data-parallel (DDP over 2 processes) give the same population and group
adapters as one process trained on the same global batches: the shards, the loss weighting, the constraint
loss across ranks and the unknown-user dropout add up to the single-process step.

Tolerance: the two runs do the same arithmetic in a different order (each rank pads its shard to its own
width, the cross-entropy is a weighted sum of shard means, gloo sums the gradients and DDP halves them), so
float32 rounding differs: one global batch's gradients agree to ~4e-7 relative (measured). Training then
carries that rounding along; at this test's lr 3e-3 over 24 steps the measured max abs difference is
~3e-7 (population ~5e-8) on adapter entries of ~1e-1. (At lr 1e-2 the group stage's routing amplifies it to
~1e-5..3e-4, which is why the test does not use a larger step.) ATOL = 1e-5 leaves 30x room for other CPUs'
kernels and stays far below a real mismatch: the constraint loss computed per shard instead of across ranks
moves the trained group adapters by 2.7e-2 (measured), its gradient by 50 % relative.
"""

import json
from pathlib import Path

import pytest
import torch
from model_helpers import SMALL, planted_groups

from proper_fed.config import BackboneConfig, ProperConfig, TrainConfig
from proper_fed.model.backbone import load_backbone
from proper_fed.train.distributed import Ranks, launch
from server.server_stages import ServerModel, train_server_model

ATOL = 1e-5
# A global batch of 7 over 2 ranks: shards of 4 and 3; 36 examples leave a last batch of 1, so rank 1 also
# runs an empty shard. A large constraint weight and unknown-user dropout make both count.
STAGE = TrainConfig(
    epochs=2, lr=3e-3, batch_size=7, progress=False, seed=0, constraint_weight=1.0, unknown_user_prob=0.25
)
EXAMPLES = planted_groups(6, 6)


def _config(device: str) -> ProperConfig:
    backbone = BackboneConfig(model="tiny", device=device, dtype="fp32")
    return ProperConfig(backbone=backbone, adapters=SMALL, population=STAGE, group=STAGE)


def _train(ranks: Ranks | None, folder: str, device: str) -> ServerModel:
    cfg = _config(device)
    return train_server_model(load_backbone(cfg.backbone), EXAMPLES, cfg, Path(folder), ranks=ranks)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _check_equal(device: str, tmp_path: Path) -> None:
    single = _train(None, str(tmp_path / "single"), device)
    ddp = launch(2, _train, str(tmp_path / "ddp"), device, device=device, threads=1)
    for scope in ("population", "group"):
        ours, ref = getattr(ddp, scope), getattr(single, scope)
        trained = max(t.abs().max().item() for k, t in ref.items() if k.endswith("_B"))
        assert trained > 1e-2, f"{scope} B matrices barely moved: the comparison would prove nothing"
        diff = _max_diff(ours, ref)
        print(f"{device} {scope}: max abs diff DDP(2) vs one process = {diff:.2e}")
        assert diff <= ATOL, f"{scope} adapters differ by {diff:.2e} > {ATOL}"
    for key in ("population.final_loss", "group.final_loss"):
        assert ddp.metrics[key] == pytest.approx(single.metrics[key], rel=1e-5)
    # rank 0 wrote the server model's files, as one process does, with the same server users' table
    assert (tmp_path / "ddp" / "group.safetensors").exists()
    saved = [
        json.loads((tmp_path / run / "group.json").read_text())["user_index"] for run in ("ddp", "single")
    ]
    assert saved[0] == saved[1] and saved[0]
    assert ddp.user_rows == single.user_rows == 1  # only the unknown-user row ships


def test_two_cpu_processes_train_the_same_adapters_as_one(tmp_path):
    _check_equal("cpu", tmp_path)


@pytest.mark.gpu
def test_two_gpus_nccl_train_the_same_adapters_as_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    _check_equal("cuda", tmp_path)
