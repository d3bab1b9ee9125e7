"""Config loading: YAML + overrides, and one-line errors for every kind of bad input."""

from __future__ import annotations

import pytest

from loco.config import load_config
from loco.errors import LocoError


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {batch_size: 64}\nmethod: {name: greedy}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim: {epochs: 3}\n")
    cfg = load_config(tmp_path / "child.yaml", ["method.temperature=0.5", "model.split=[2, 4]"])
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.method.name) == (64, 3, "greedy")
    assert cfg.method.temperature == 0.5 and cfg.model.split == [2, 4]


def test_every_shipped_config_parses():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.batchsize=3", "did you mean 'batch_size'"),
        ("optimm.lr=3", "did you mean 'optim'"),
        ("optim.batch_size=abc", "expected an integer"),
        ("method.name=loko", "not one of"),
        ("optim.batch_size=0", "must be > 0"),
        ("data.blur_prob=2", "probability"),
        ("nokey", "not key=value"),
        ("data.dataset=folder", "needs data.root"),
        ("train.recompute=S1=some", "not understood"),
        ("train.recompute=S1=-1", "not understood"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(LocoError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(LocoError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(LocoError, match="not valid YAML"):
        load_config(bad)


def test_cli_prints_error_without_traceback(capsys):
    from loco.cli import main

    assert main(["pretrain", "optim.bacth_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'optim.bacth_size'") and "Traceback" not in err
