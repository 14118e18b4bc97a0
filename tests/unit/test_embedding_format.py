"""Embeddings without a model or a database: ``VIDQ_EMBEDDINGS`` and its flag parse, and a
bad value is one line; a vector's float16 bytes round-trip and match numpy's.
The captured features and what vidq stores and finds: tests/test_embeddings.py."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli import run_vidq
from vidq.embeddings import float16_from_floats, floats_from_float16
from vidq.errors import ConfigError
from vidq.settings import Settings


def test_the_setting_defaults_to_off_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    assert Settings.from_env({}).embeddings == "off"
    assert Settings.from_env({"VIDQ_EMBEDDINGS": "clip"}).embeddings == "clip"
    assert Settings.from_env({"VIDQ_EMBEDDINGS": "clip"}, embeddings="video").embeddings == "video"
    with pytest.raises(ConfigError, match="VIDQ_EMBEDDINGS='frames' is not one of off, video"):
        Settings.from_env({"VIDQ_EMBEDDINGS": "frames"})
    env = {"VIDQ_DATABASE_URL": f"sqlite:///{tmp_path / 'v.db'}"}
    bad_env = run_vidq("status", env={**os.environ, **env, "VIDQ_EMBEDDINGS": "yes"})
    assert bad_env.returncode == 2 and "Traceback" not in bad_env.stderr
    assert bad_env.stderr.strip().splitlines() == [
        "vidq: error: VIDQ_EMBEDDINGS='yes' is not one of off, video, clip."]
    bad_flag = run_vidq("run", "x.mp4", "--embeddings", "frames", env={**os.environ, **env})
    assert bad_flag.returncode == 2 and "'frames' is not one of 'off', 'video', 'clip'" in (
        bad_flag.stderr)


def test_float16_bytes_round_trip_and_match_numpy() -> None:
    from worker.inference import float16_bytes

    values = torch.tensor([0.0, 1.0, -2.5, 1e-6, 3.14159, 70000.0, -1e9])
    blob = float16_bytes(values)
    assert blob == np.clip(values.numpy(), -65504, 65504).astype("<f2").tobytes()
    assert floats_from_float16(blob)[:5] == (
        0.0, 1.0, -2.5, float(np.float16(1e-6)), float(np.float16(3.14159)))
    assert floats_from_float16(blob)[5:] == (65504.0, -65504.0)  # clamped, not infinite
    assert float16_from_floats(floats_from_float16(blob)) == blob
    assert struct.calcsize("<2048e") == 4096
