"""Checkpoints are verified before they are trusted: the pretrained file against the
preset's pinned sha256, and every file read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from vidq.errors import ConfigError
from worker import models
from worker.models import file_sha256, get_preset, hub_checkpoint_path, load_model


class MakesADirectory:
    """Unpickling this creates a directory: proof that arbitrary pickle was (not) run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def pin(monkeypatch: pytest.MonkeyPatch, name: str, sha256: str | None) -> models.ModelPreset:
    preset = dataclasses.replace(get_preset(name), sha256=sha256)
    monkeypatch.setitem(models.PRESETS, name, preset)
    return preset


def write_hub_checkpoint(preset: models.ModelPreset) -> Path:
    """A checkpoint in the hub's .pyth layout, where `pretrained` looks for it."""
    path = hub_checkpoint_path(preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save({"model_state": preset.build().state_dict()}, path)
    return path


def test_a_pretrained_checkpoint_with_the_pinned_hash_loads(
    hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = get_preset("x3d_xs")
    path = write_hub_checkpoint(preset)
    preset = pin(monkeypatch, "x3d_xs", file_sha256(path))
    loaded = load_model(preset, "pretrained")
    assert loaded.weights_id == "sha256:" + preset.sha256


def test_a_pretrained_checkpoint_with_another_hash_is_refused_in_one_line(
    hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any file at the hub cache path was loaded, whatever its content."""
    path = write_hub_checkpoint(get_preset("x3d_xs"))
    preset = pin(monkeypatch, "x3d_xs", "0" * 64)
    with pytest.raises(ConfigError) as refused:
        load_model(preset, "pretrained")
    message = refused.value.message
    assert "\n" not in message and file_sha256(path) in message and "0" * 64 in message


def test_the_operator_pin_overrides_the_presets_and_an_unpinned_pretrained_warns(
    hub_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_hub_checkpoint(get_preset("x3d_xs"))
    digest = file_sha256(path)
    preset = pin(monkeypatch, "x3d_xs", "0" * 64)  # the built-in pin is stale
    assert load_model(preset, "pretrained", sha256=digest).weights_id == "sha256:" + digest
    with pytest.raises(ConfigError, match="VIDQ_WEIGHTS_SHA256's " + "1" * 64):
        load_model(pin(monkeypatch, "x3d_xs", digest), "pretrained", sha256="1" * 64)
    assert "not verified" not in caplog.text
    with caplog.at_level("WARNING", logger="vidq.models"):
        load_model(pin(monkeypatch, "x3d_xs", None), "pretrained")
    assert f"(sha256 {digest}) is not verified against a pin" in caplog.text


def test_a_pin_with_random_weights_is_a_contradiction() -> None:
    with pytest.raises(ConfigError, match="VIDQ_WEIGHTS=random loads none"):
        load_model(get_preset("x3d_xs"), "random", sha256="1" * 64)


def test_every_published_preset_has_a_hash_field() -> None:
    for preset in models.PRESETS.values():
        assert preset.sha256 is None or len(preset.sha256) == 64, preset.name


def test_a_checkpoint_that_unpickles_code_is_refused_not_run(
    tmp_path: Path, hub_dir: Path
) -> None:
    """Before: a file that weights_only=True refused was loaded again with full pickle,
    which runs whatever the file says."""
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pyth"
    torch.save({"model_state": {}, "extra": MakesADirectory(str(marker))}, path)
    with pytest.raises(ConfigError, match="weights_only=True") as refused:
        load_model(get_preset("x3d_xs"), str(path))
    assert "\n" not in refused.value.message
    assert not marker.exists(), "the checkpoint's pickle was executed"
