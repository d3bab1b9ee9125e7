"""Shared fixtures: real images from the shipped datasets, extracted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ``val/<class>/*.jpg``: the shipped CIFAR-10 test split (10 x 1000, 32 px),
    extracted by :func:`loco.data.prepare_shipped` into a session temp cache."""
    from loco.data.shipped import prepare_shipped

    return prepare_shipped("cifar10", tmp_path_factory.mktemp("loco-cache"), splits=["val"])
