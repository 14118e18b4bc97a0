"""Post-training static int8 on CPU: calibration files and the quantized model.

On a CPU without fast bf16, vidq's fp32 fast path sits near the hardware's fp32
peak; int8 goes past it. The model is quantized with PyTorch's FX graph mode
(fbgemm kernels): weights per output channel (symmetric int8), activations per
tensor (uint8) with scales from a calibration, i.e. from the activation ranges
the float model showed on real clips. The input pipeline (the seed's transforms)
is unchanged: the graph quantizes its float input itself.

What runs in int8 was measured per stage (slow_r50, AVX2 EPYC, 2 threads, batch 1,
s per clip): everything in fp32 0.85; everything in int8 0.153; the head
(``blocks.5``: pool, linear, pool) kept in float 0.152; head and stem in float
0.213. So the stem and the four residual stages are quantized and the head stays
float: it costs nothing there and keeps the logits free of an 8-bit output grid.

A calibration is reproducible: the same clips through the same float model give
the same observer statistics, and its id is a hash of that content (not of the
file's bytes, which also carry the file's name), so ``vidq calibrate`` run twice
on the same videos writes the same id. Every result records it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from vidq.errors import ConfigError, VidqError
from vidq.sampling import Sampling, plan_windows
from worker.models import ModelPreset
from worker.transforms import clip_views
from worker.video import VideoReader

CALIBRATION_FORMAT = "vidq-int8-calibration/1"
"""Written into every calibration file; a file without it is refused."""

BACKEND = "fbgemm"
"""The x86 int8 kernels (AVX2 and AVX512); observers reduce the range by one bit
for them, since AVX2's int8 multiply-add can overflow on the full range."""

FLOAT_MODULES = ("blocks.5",)
"""Kept in float: slow_r50's head (see the module docstring for the measurement)."""

_OBSERVER_PREFIX = "activation_post_process_"


@dataclass(frozen=True)
class Calibration:
    """Activation statistics of one model with one set of weights."""

    model: str
    weights_id: str
    clips: int
    """How many clips were run through the float model."""
    observers: dict[str, torch.Tensor]
    """The prepared graph's activation observer state (histogram, min, max each)."""
    calibration_id: str
    """``sha256:<hex>`` of the content above: what results record."""


def refuse_unsupported_preset(preset: ModelPreset) -> None:
    """int8 only where it was measured faster than fp32 (``ModelPreset.cpu_int8``)."""
    if not preset.cpu_int8:
        raise ConfigError(
            f"Precision int8 is refused for {preset.name}: its depthwise 3D convolutions run "
            f"5-7x slower in int8 than in fp32 on CPU (x3d_xs 0.198 vs 0.041 s per clip, "
            f"x3d_m 1.61 vs 0.22 s); use --precision fp32."
        )


def check_int8_supported(preset: ModelPreset, calibration_path: str) -> None:
    """Refuse int8 before any weights are loaded: for a preset it does not speed
    up, and without a calibration file (never calibrate silently on made-up data)."""
    refuse_unsupported_preset(preset)
    if not calibration_path:
        raise ConfigError(
            "Precision int8 needs a calibration: run `vidq calibrate VIDEO... --out FILE` "
            "with the same model and weights, then set VIDQ_INT8_CALIBRATION=FILE."
        )
    if not Path(calibration_path).is_file():
        raise ConfigError(
            f"Calibration file {calibration_path} does not exist; write one with "
            "`vidq calibrate VIDEO... --out FILE`."
        )


def _qconfig_mapping() -> Any:
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(BACKEND)
    for name in FLOAT_MODULES:
        mapping.set_module_name(name, None)
    return mapping


def prepare(module: nn.Module, *, preset: ModelPreset) -> GraphModule:
    """A copy of the (BN-folded, eval) float ``module`` with observers inserted."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    example = torch.zeros(1, 3, preset.num_frames, preset.crop_size, preset.crop_size)
    with warnings.catch_warnings():
        # torch 2.10+ points FX quantization users at torchao; the API still works.
        warnings.simplefilter("ignore")
        return prepare_fx(copy.deepcopy(module).eval(), _qconfig_mapping(),
                          example_inputs=(example,))


def _observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in prepared.state_dict().items()
        if name.startswith(_OBSERVER_PREFIX)
    }


def _content_id(header: dict[str, Any], observers: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(observers):
        tensor = observers[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _header(*, model: str, weights_id: str, clips: int) -> dict[str, Any]:
    return {
        "format": CALIBRATION_FORMAT, "backend": BACKEND, "float_modules": list(FLOAT_MODULES),
        "model": model, "weights_id": weights_id, "clips": clips,
    }


def make_calibration(
    *, model: str, weights_id: str, clips: int, observers: dict[str, torch.Tensor]
) -> Calibration:
    header = _header(model=model, weights_id=weights_id, clips=clips)
    return Calibration(model, weights_id, clips, observers, _content_id(header, observers))


def calibrate(
    module: nn.Module, *, preset: ModelPreset, weights_id: str, views: Iterable[torch.Tensor]
) -> Calibration:
    """Run each (1, 3, T, S, S) view batch through the observed float model."""
    prepared = prepare(module, preset=preset)
    clips = 0
    with torch.no_grad():
        for batch in views:
            prepared(batch)
            clips += batch.shape[0]
    if clips == 0:
        raise ConfigError("No clip could be read from the calibration videos.")
    return make_calibration(
        model=preset.name, weights_id=weights_id, clips=clips, observers=_observer_state(prepared)
    )


def calibration_views(
    paths: Iterable[str | Path], *, preset: ModelPreset, clips: int
) -> Iterator[torch.Tensor]:
    """``clips`` clips spread evenly over the videos (uniform windows in each), through
    the same decode and transforms as ``vidq classify``. A video that cannot be read
    stops the calibration with its error: a calibration says exactly what it saw."""
    path_list = [str(p) for p in paths]
    per_video = max(1, math.ceil(clips / max(len(path_list), 1)))
    left = clips
    for path in path_list:
        if left <= 0:
            return
        try:
            with VideoReader(path) as reader:
                sampling = Sampling(strategy="uniform", clips=min(per_video, left))
                windows = plan_windows(sampling, reader.info.duration_s, preset.clip_duration)
                for clip in reader.clips(windows, num_frames=preset.num_frames):
                    yield clip_views(clip.rgb, preset)
                    left -= 1
        except VidqError as exc:
            raise ConfigError(f"Cannot calibrate on {path}: {exc.message}") from None


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    """A ``torch.load(weights_only=True)``-loadable file: plain dict, str, int, tensors."""
    header = _header(
        model=calibration.model, weights_id=calibration.weights_id, clips=calibration.clips
    )
    torch.save(
        {**header, "observers": calibration.observers,
         "calibration_id": calibration.calibration_id},
        str(path),
    )


def load_calibration(path: str | Path, *, preset: ModelPreset, weights_id: str) -> Calibration:
    """Read a calibration and refuse one made for another model or other weights."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (any unreadable file gets the one line below)
        raw = None
    observers = raw.get("observers") if isinstance(raw, dict) else None
    if (
        not isinstance(raw, dict)
        or raw.get("format") != CALIBRATION_FORMAT
        or not isinstance(observers, dict)
        or not all(isinstance(t, torch.Tensor) for t in observers.values())
    ):
        raise ConfigError(
            f"{path} is not a vidq int8 calibration; write one with `vidq calibrate`."
        )
    calibration = make_calibration(
        model=str(raw.get("model")), weights_id=str(raw.get("weights_id")),
        clips=int(raw.get("clips", 0)), observers=dict(observers),
    )
    if calibration.calibration_id != raw.get("calibration_id"):
        raise ConfigError(
            f"Calibration {path} was changed after `vidq calibrate` wrote it (its content no "
            "longer matches its id); run `vidq calibrate` again."
        )
    if calibration.model != preset.name:
        raise ConfigError(
            f"Calibration {path} was made for model {calibration.model}, not {preset.name}; "
            f"run `vidq calibrate --model {preset.name}` to make one."
        )
    if calibration.weights_id != weights_id:
        raise ConfigError(
            f"Calibration {path} was made for weights {calibration.weights_id[:19]}, not "
            f"{weights_id[:19]} (the weights in use); run `vidq calibrate` with these weights."
        )
    return calibration


def quantize(module: nn.Module, *, preset: ModelPreset, calibration: Calibration) -> nn.Module:
    """The int8 model: ``module`` (BN-folded, eval, CPU) observed with ``calibration``'s
    statistics, then converted to fbgemm int8 kernels."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = prepare(module, preset=preset)
    expected = set(_observer_state(prepared))
    if set(calibration.observers) != expected:
        raise ConfigError(
            f"Calibration {calibration.calibration_id[:19]} does not fit this vidq's int8 "
            "recipe (different observers); run `vidq calibrate` again."
        )
    prepared.load_state_dict(calibration.observers, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared).eval()
