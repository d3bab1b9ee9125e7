"""`loco export`: the exported backbone loads the way a user loads it, with no loco import,
and gives the features loco computes (per stage, and pooled for ResNets)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from loco import checkpoint as ckpt
from loco.cli import main
from loco.config import config_from_dict, load_config
from loco.errors import LocoError
from loco.eval.network import load_backbone
from loco.train import pretrain

# Runs in a fresh interpreter that never imports loco: loads FILE in FORMAT the way the README
# shows, then saves the per-stage outputs named by the metadata (and the pooled features).
USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, timm
    fmt, path, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as f:
            raw = f.metadata()
        meta = {k: (v if k in ("timm_model", "stem_change", "weights", "method", "readout",
                               "source", "loco_version", "config_hash") else json.loads(v))
                for k, v in raw.items()}
        state = load_file(path)
    else:
        meta = json.load(open(path + ".json"))
        state = torch.load(path)
    assert "loco" not in sys.modules
    if fmt == "torchvision":
        import torchvision
        model = getattr(torchvision.models, meta["timm_model"])()
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"], result.missing_keys
        model.fc = torch.nn.Identity()
    elif meta["small_image_stem"]:
        model = timm.create_model(meta["timm_model"], num_classes=0, **meta["timm_kwargs"])
        exec(meta["stem_change"])
        model.load_state_dict(state)
    else:
        model = timm.create_model(meta["timm_model"], num_classes=0, checkpoint_path=path
                                  if fmt == "timm" else "", **meta["timm_kwargs"])
        if fmt != "timm":
            model.load_state_dict(state)
    model.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    outs = {}
    with torch.no_grad():
        if fmt == "torchvision":
            outs["pooled"] = model(x).numpy()
        else:
            names = [f["module"] for f in model.feature_info]
            idx = [names.index(s) for s in meta["stages"] if s != "forward_features"]
            feats = model.forward_intermediates(x, indices=idx, intermediates_only=True,
                                                **({"return_prefix_tokens": True}
                                                   if hasattr(model, "_pos_embed") else {}))
            if meta["stages"][-1] == "forward_features":
                feats.append(model.forward_features(x))
            for k, f in enumerate(feats):
                if isinstance(f, tuple):  # ViT: (spatial NCHW, prefix tokens) -> tokens
                    spatial, prefix = f
                    f = torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], 1)
                outs[f"s{k + 1}"] = f.numpy()
            if meta["timm_model"].startswith("resnet"):
                outs["pooled"] = model(x).numpy()
    np.savez(out, **outs)
    """
)

MODELS = {
    "resnet18": ["model.backbone=resnet18", "model.small_image=false"],
    "resnet_small_stem": ["model.backbone=resnet18", "model.kwargs={channels: [8, 16, 32, 64]}"],
    "vit": ["model.backbone=vit_tiny_patch16_224", "model.kwargs={patch_size: 8, depth: 4}"],
    "convnext": ["model.backbone=convnext_atto", "model.small_image=false"],
}


@pytest.fixture(scope="module")
def runs(tiny_folder_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return {
        name: pretrain(
            load_config(
                None,
                tiny_overrides(
                    tiny_folder_root,
                    out / name,
                    "optim.max_steps=1",
                    "method.name=greedy",
                    *extra,
                    channels=None,
                    image_size=32,
                ),
            )
        )
        for name, extra in MODELS.items()
    }


def _user_load(fmt: str, path, tmp_path, size: int = 32) -> dict[str, np.ndarray]:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    out = tmp_path / "feats.npz"
    subprocess.run(
        [sys.executable, str(script), fmt, str(path), str(out), str(size)],
        check=True,
        cwd=tmp_path,
    )
    return dict(np.load(out))


def _ours(run) -> dict[str, np.ndarray]:
    cfg, backbone, _ = load_backbone(run / "checkpoint.pt")
    backbone.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = backbone(x)
    feats = {f"s{k + 1}": o.numpy() for k, o in enumerate(outs)}
    feats["pooled"] = outs[-1].mean(dim=(2, 3)).numpy() if outs[-1].dim() == 4 else None
    return feats


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("resnet18", "timm"),
        ("resnet18", "torchvision"),
        ("resnet18", "safetensors"),
        ("resnet_small_stem", "timm"),
        ("vit", "timm"),
        ("convnext", "safetensors"),
    ],
)
def test_export_loads_without_loco_and_gives_our_features(runs, name, fmt, tmp_path, capsys):
    run = runs[name]
    dest = tmp_path / f"{name}.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    assert main(["export", str(run), "--to", fmt, "--out", str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out
    theirs = _user_load(fmt, dest, tmp_path)
    ours = _ours(run)
    keys = ["pooled"] if fmt == "torchvision" else sorted(theirs)
    assert keys and all(k in ours for k in keys)
    for k in keys:
        np.testing.assert_allclose(theirs[k], ours[k], rtol=1e-4, atol=1e-5, err_msg=k)
    if name.startswith("resnet"):  # stages and pooled features both compared
        assert {"s1", "s4", "pooled"} <= set(keys) or fmt == "torchvision"


def test_export_metadata_and_safetensors_round_trip(runs, tmp_path):
    from safetensors.torch import load_file

    from loco.export import export

    run = runs["resnet_small_stem"]
    result = export(run, "safetensors", tmp_path / "w.safetensors")
    state = ckpt.load(run / "checkpoint.pt")
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == state["backbone"].keys()
    assert all(torch.equal(loaded[k], state["backbone"][k]) for k in loaded)
    meta = result.metadata
    cfg = config_from_dict(state["config"])
    assert meta["timm_model"] == "resnet18" and meta["method"] == "greedy" and meta["step"] == 1
    assert meta["small_image_stem"] is True and "maxpool" in meta["stem_change"]
    assert meta["mean"] == cfg.data.mean and meta["stages"] == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    timm_meta = json.loads(
        (export(run, "timm", tmp_path / "w.pth").path.parent / "w.pth.json").read_text()
    )
    assert timm_meta["config_hash"] == meta["config_hash"]


def test_export_errors(runs, tmp_path):
    from loco.export import export

    with pytest.raises(LocoError, match="covers the ResNets torchvision ships"):
        export(runs["vit"], "torchvision", tmp_path / "x.pth")
    with pytest.raises(LocoError, match="not torchvision's"):
        export(runs["resnet_small_stem"], "torchvision", tmp_path / "x.pth")
    with pytest.raises(LocoError, match="holds no momentum"):
        export(runs["vit"], "timm", tmp_path / "x.pth", ema=True)
    with pytest.raises(LocoError, match="no checkpoint at"):
        export(tmp_path / "nope", "timm")
    assert not list(tmp_path.glob("x.pth*"))
