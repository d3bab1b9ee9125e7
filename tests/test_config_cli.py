"""`loco config`: every key with type, default and help, generated from the dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from loco.cli import main
from loco.config import Config, config_from_dict
from loco.config_cli import as_yaml, config_rows
from loco.errors import LocoError


def test_every_key_has_help():
    cfg = Config()
    missing = [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, s.name))
        if not f.metadata.get("help", "").strip()
    ]
    assert missing == []


def test_rows_cover_every_key_with_its_default():
    def keys(d: dict, prefix: str) -> set[str]:  # nested sections: objective.byol.*
        return {
            key
            for k, v in d.items()
            for key in (
                keys(v, f"{prefix}{k}.")
                if isinstance(v, dict) and k != "kwargs"
                else [f"{prefix}{k}"]
            )
        }

    rows = {key: (tp, default) for key, tp, default, _ in config_rows()}
    assert set(rows) == keys(Config().to_dict(), "")
    assert rows["objective.vicreg.sim_coeff"] == ("float", "25.0")
    assert rows["method.temperature"] == ("float", "0.2")
    assert rows["optim.batch_size"] == ("int", "256")
    assert rows["data.mean"][0] == "list[float]"


def test_yaml_is_a_loadable_config_of_the_defaults():
    """The commented YAML, read back as a config, is exactly the defaults (an independent
    round trip through load_config's own parser)."""
    data = yaml.safe_load(as_yaml())
    assert data == Config().to_dict()
    assert config_from_dict(data) == Config()
    assert yaml.safe_load(as_yaml("optim")) == {"optim": Config().to_dict()["optim"]}


def test_cli_section_and_errors(capsys):
    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.precision" in out and "fp16" in out and "method." not in out
    with pytest.raises(LocoError, match="did you mean 'model'"):
        config_rows("moddel")
    assert main(["config", "moddel"]) == 2
