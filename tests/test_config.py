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


def test_method_names_come_from_the_registry():
    """The registry is the one list: a method registered later is accepted without touching
    config.py, and the error lists exactly the registered names."""
    from loco.config import CHOICES
    from loco.methods import METHODS, register
    from loco.methods.greedy import Greedy

    assert not any(key.startswith("method.") for key in CHOICES)
    with pytest.raises(LocoError) as info:
        load_config(None, ["method.name=nosuch"])
    assert str(info.value).endswith(f"is not one of {', '.join(sorted(METHODS))}")
    assert "loco_naive" in METHODS  # the bench's naive LoCo is a registered method

    @register
    class Extra(Greedy):
        name = "extra_for_test"

    try:
        assert load_config(None, ["method.name=extra_for_test"]).method.name == "extra_for_test"
    finally:
        del METHODS["extra_for_test"]


@pytest.mark.parametrize(
    "overrides, owner",
    [
        (["method.name=loco", "method.lambda1_first=3"], "infopro"),
        (["method.name=e2e", "method.shared_update=upper"], "loco and loco_naive"),
        (["method.name=greedy", "method.first_stage_loss=false"], "loco and loco_naive"),
        (["method.name=infopro", "method.first_stage_loss=false"], "loco and loco_naive"),
        (["method.name=loco", "method.supervised=true"], "infopro"),
    ],
)
def test_a_changed_option_of_another_method_is_rejected(overrides, owner):
    with pytest.raises(LocoError, match=f"has no effect with .*an option of {owner};") as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_options_at_their_defaults_pass_for_every_method(tmp_path):
    """A dumped config (every key at its default) loads again for each method: resume and
    `loco eval` read such files."""
    from loco.config import dump_yaml
    from loco.methods import METHODS

    for name in METHODS:
        cfg = load_config(None, [f"method.name={name}"])
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_yaml(cfg))
        assert load_config(path).method == cfg.method
    assert load_config(None, ["method.name=infopro", "method.lambda1_first=3"])
    assert load_config(None, ["method.name=loco", "method.shared_update=upper"])
    with pytest.raises(LocoError, match="'method.shared_update' = 'lower' is not one of both"):
        load_config(None, ["method.shared_update=lower"])


def test_every_method_option_has_an_owner():
    import dataclasses

    from loco.config import MethodConfig
    from loco.methods import METHODS
    from loco.methods.base import SHARED_OPTIONS

    owned = set(SHARED_OPTIONS).union(*(cls.options for cls in METHODS.values()))
    assert owned == {f.name for f in dataclasses.fields(MethodConfig)}


def test_bench_gives_each_method_only_its_own_options():
    from loco.config import MethodConfig
    from loco.methods.base import options_for

    m = MethodConfig(name="loco", temperature=0.5, shared_update="upper", lambda1_first=3.0)
    assert options_for(m, "e2e") == MethodConfig(name="e2e", temperature=0.5)
    assert options_for(m, "infopro") == MethodConfig(
        name="infopro", temperature=0.5, lambda1_first=3.0
    )


def test_quickstart_reads_its_one_shipped_config():
    """loco/quickstart.yaml is the quickstart's only config and holds the values the
    quickstart always ran with (the list once embedded in loco/quickstart.py)."""
    from loco.config import Config, dump_yaml
    from loco.quickstart import CONFIG

    recorded = [
        "data.dataset=cifar10",
        "data.image_size=32",
        "data.per_class=1000",
        "data.num_workers=1",
        "model.backbone=resnet18",
        "model.small_image=true",
        "model.kwargs={channels: [16, 32, 64, 128]}",
        "method.name=loco",
        "method.temperature=0.2",
        "optim.name=lars",
        "optim.batch_size=128",
        "optim.base_lr=1.0",
        "optim.weight_decay=1e-6",
        "optim.max_steps=200",
        "optim.warmup_epochs=0.5",
        "train.output_dir=runs/quickstart",
        "train.log_every=20",
        "train.ckpt_every=100",
    ]
    assert CONFIG.is_file() and CONFIG.parent.name == "loco"
    assert dump_yaml(load_config(CONFIG)) == dump_yaml(load_config(None, recorded))
    assert dump_yaml(load_config(CONFIG)) != dump_yaml(Config())
