"""model.sync_bn converts every BatchNorm of the method (backbone and decoders) for CUDA,
and a multi-process CPU run keeps plain BatchNorm with one warning instead of crashing.

There is no GPU here: the conversion is checked structurally for a CUDA target (a 1-process
gloo group, device "cuda" given to the function); its numeric check on a GPU is
tools/gpu_check.py's ``syncbn_decoders``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.layers import BatchNormAct2d, SyncBatchNormAct

from loco.config import Config, DecoderConfig, ModelConfig, load_config
from loco.distributed import free_port
from loco.methods import build_method
from loco.models.backbone import build_backbone
from loco.models.sync_bn import sync_batchnorm


def _method(backbone: str) -> nn.Module:
    cfg = Config()
    cfg.model = ModelConfig(backbone=backbone, sync_bn=True)
    cfg.decoder = DecoderConfig(conv_block=True, hidden_dim=32, out_dim=16)
    cfg.method.name = "greedy"
    return build_method(build_backbone(cfg.model, 32), cfg)


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("backbone", ["resnet18", "regnetx_002"])
def test_every_batchnorm_of_the_method_is_synced_for_cuda(backbone, one_process_group, one_thread):
    method = _method(backbone)
    before = _norms(method)
    with_act = [type(m.act) for m in before if isinstance(m, BatchNormAct2d)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in _norms(method.heads))  # the MLP's
    assert any(isinstance(m, nn.BatchNorm2d) for m in _norms(method.heads))  # the conv blocks'
    converted = sync_batchnorm(method, torch.device("cuda"))
    after = _norms(converted)
    assert len(after) == len(before)
    assert all(isinstance(m, (nn.SyncBatchNorm, SyncBatchNormAct)) for m in after)
    # timm's norm+activation layers keep their activation (nn.SyncBatchNorm would drop it)
    assert [type(m.act) for m in after if isinstance(m, SyncBatchNormAct)] == with_act
    if backbone == "regnetx_002":
        assert with_act


def test_cpu_or_no_group_keeps_plain_batchnorm(tmp_path, one_thread):
    method = _method("resnet18")
    assert sync_batchnorm(method, "cuda") is method  # no process group: nothing to sync
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in method.modules())


def _pretrain_worker(rank: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "sync_bn" in record.getMessage():
                warnings.append(record.getMessage())

    logging.getLogger("loco").addHandler(Collect(logging.WARNING))
    from loco.train import pretrain

    pretrain(load_config(None, overrides))
    Path(out, f"warnings{rank}.json").write_text(json.dumps(warnings))


@pytest.mark.distributed
def test_two_cpu_processes_with_sync_bn_train_and_warn_once(cifar_val_root, tmp_path):
    overrides = [
        "data.dataset=folder",
        f"data.root={cifar_val_root}",
        "data.train_split=val",
        "data.per_class=1",
        "data.num_workers=0",
        "optim.batch_size=4",
        "optim.max_steps=1",
        "model.sync_bn=true",
        "model.kwargs={channels: [16, 32, 64, 128]}",
        "decoder.conv_block=true",
        "decoder.hidden_dim=32",
        "decoder.out_dim=16",
        "monitor.online_linear=false",
        "train.device=cpu",
        "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    mp.spawn(_pretrain_worker, args=(free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    warnings = [w for r in (0, 1) for w in json.loads((tmp_path / f"warnings{r}.json").read_text())]
    assert len(warnings) == 1 and "no effect on cpu" in warnings[0]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
