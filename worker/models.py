"""Model presets (architecture + the input pipeline it was trained with) and weights.

A preset is data, not code: adding another PyTorchVideo Kinetics model is one
entry in ``PRESETS``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from vidq.errors import ConfigError

RANDOM_WEIGHTS_ID = "random-init"
log = logging.getLogger("vidq.models")
_HUB_ROOT = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics"


@dataclass(frozen=True)
class ModelPreset:
    """An architecture and the input pipeline its published checkpoint expects."""

    name: str
    builder: str
    """Attribute of ``pytorchvideo.models.hub`` that builds the architecture."""
    checkpoint_url: str
    num_frames: int
    sampling_rate: int
    side_size: int
    crop_size: int
    frames_per_second: int = 30
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)
    num_classes: int = 400
    sha256: str | None = None
    """Pinned sha256 of the published checkpoint: ``pretrained`` weights (downloaded or
    found in the hub cache) with another hash are refused. None = not pinned yet."""
    cpu_bf16: bool = True
    """Whether ``--precision auto`` picks bf16 on an AMX CPU. X3D's depthwise 3D
    convolutions run far slower in bf16 than fp32 through oneDNN (measured ~13x on
    x3d_xs), while slow_r50's dense ones run ~5x faster."""
    cpu_int8: bool = True
    """Whether ``--precision int8`` is offered. Measured with fbgemm on an AVX2 EPYC
    (2 threads, batch 1, s per clip, fp32 fast path vs int8): slow_r50 0.85 vs 0.15
    (5.5x faster); x3d_xs 0.041 vs 0.198, x3d_s 0.143 vs 0.689, x3d_m 0.219 vs 1.61
    (5-7x slower: int8 depthwise 3D convolutions have no fast kernel), so X3D refuses it."""

    @property
    def clip_duration(self) -> Fraction:
        """Seconds one clip spans: frames x sampling rate at the training frame rate."""
        return Fraction(self.num_frames * self.sampling_rate, self.frames_per_second)

    def build(self) -> nn.Module:
        with warnings.catch_warnings():
            # pytorchvideo 0.1.5 scripts a helper at import; torch now warns about it.
            warnings.filterwarnings("ignore", category=FutureWarning)
            import pytorchvideo.models.hub as hub

        factory: Callable[..., nn.Module] = getattr(hub, self.builder)
        module = factory(pretrained=False)
        # The X3D hub heads end in a Softmax (slow_r50's does not). The classifier
        # applies softmax itself, so every preset must return logits: a second
        # softmax would squash all scores towards 1/400.
        blocks = cast(nn.ModuleList, module.get_submodule("blocks"))  # the hub's Net
        head: Any = blocks[-1]
        if getattr(head, "activation", None) is not None:
            head.activation = None
        return module


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # The seed: PyTorch Hub facebookresearch/pytorchvideo slow_r50, 8x8, 74.58 top-1.
        # sha256 not pinned here: the published file's hash could not be obtained
        # offline (no network where this was written). Until it is, operators pin it
        # with VIDQ_WEIGHTS_SHA256 (`sha256sum SLOW_8x8_R50.pyth` of a trusted copy).
        ModelPreset(
            name="slow_r50",
            builder="slow_r50",
            checkpoint_url=f"{_HUB_ROOT}/SLOW_8x8_R50.pyth",
            num_frames=8,
            sampling_rate=8,
            side_size=256,
            crop_size=256,
        ),
        # X3D presets as published in the PyTorchVideo hub page for X3D.
        ModelPreset(
            name="x3d_xs",
            builder="x3d_xs",
            cpu_bf16=False,
            cpu_int8=False,
            checkpoint_url=f"{_HUB_ROOT}/X3D_XS.pyth",
            num_frames=4,
            sampling_rate=12,
            side_size=182,
            crop_size=182,
        ),
        ModelPreset(
            name="x3d_s",
            builder="x3d_s",
            cpu_bf16=False,
            cpu_int8=False,
            checkpoint_url=f"{_HUB_ROOT}/X3D_S.pyth",
            num_frames=13,
            sampling_rate=6,
            side_size=182,
            crop_size=182,
        ),
        ModelPreset(
            name="x3d_m",
            builder="x3d_m",
            cpu_bf16=False,
            cpu_int8=False,
            checkpoint_url=f"{_HUB_ROOT}/X3D_M.pyth",
            num_frames=16,
            sampling_rate=5,
            side_size=256,
            crop_size=256,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"Unknown model {name!r}; choose one of: {known}.") from None


@lru_cache(maxsize=1)
def kinetics400_labels() -> tuple[str, ...]:
    """The 400 Kinetics class names in the hub's id order, from torchvision's metadata."""
    from torchvision.models.video import R3D_18_Weights

    return tuple(R3D_18_Weights.KINETICS400_V1.meta["categories"])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_checkpoint_path(preset: ModelPreset) -> Path:
    """Where torch hub caches the preset's published checkpoint (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(preset.checkpoint_url)


def resolve_checkpoint(preset: ModelPreset, weights: str) -> Path | None:
    """The checkpoint file ``weights`` names (downloading ``pretrained`` if needed).

    Returns None for ``random``. Raises ConfigError with what to do otherwise.
    """
    if weights == "random":
        return None
    if weights != "pretrained":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Weights file {weights} does not exist; set VIDQ_WEIGHTS (or --weights) to "
                "a checkpoint file, 'pretrained' or 'random'."
            )
        return path
    cached = hub_checkpoint_path(preset)
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(preset.checkpoint_url, str(cached), progress=False)
    except Exception as exc:  # any network or HTTP failure: say what to do instead
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"Cannot download pretrained weights for {preset.name} from "
            f"{preset.checkpoint_url} ({reason}). Offline? Copy "
            f"{os.path.basename(preset.checkpoint_url)} here and set VIDQ_WEIGHTS=/path/to/it "
            f"(or --weights PATH, or place it at {cached}); VIDQ_WEIGHTS=random runs untrained."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def normalize_sha256(raw: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` (any case) -> lower-case hex; ConfigError otherwise."""
    value = raw.strip().lower().removeprefix("sha256:")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"VIDQ_WEIGHTS_SHA256={raw!r} is not a sha256 (64 hex digits).")
    return value


def verify_pinned(preset: ModelPreset, path: Path, *, weights: str, pinned: str = "") -> str:
    """The checkpoint's sha256, after checking it against the pin: ``pinned``
    (``VIDQ_WEIGHTS_SHA256``, for any checkpoint) or else, for ``pretrained``, the
    preset's own. A checkpoint nothing pins is loaded with a warning that says so."""
    digest = file_sha256(path)
    expected = normalize_sha256(pinned) if pinned else (
        preset.sha256 if weights == "pretrained" else None)
    if expected is not None and digest != expected:
        whose = ("VIDQ_WEIGHTS_SHA256's" if pinned
                 else f"the published {preset.name} checkpoint's")
        raise ConfigError(
            f"Checkpoint {path} has sha256 {digest}, not {whose} {expected}; refusing it. "
            + ("Delete it so it is downloaded again, or set VIDQ_WEIGHTS to a checkpoint "
               "you trust." if weights == "pretrained" else
               "Point VIDQ_WEIGHTS at the checkpoint you pinned, or fix the pin.")
        )
    if expected is None and weights == "pretrained":
        log.warning("pretrained %s checkpoint %s (sha256 %s) is not verified against a pin; "
                    "set VIDQ_WEIGHTS_SHA256 to the hash of a copy you trust", preset.name,
                    path, digest)
    return digest


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Accept the hub's ``.pyth`` (``{"model_state": ...}``) and plain state dicts."""
    if isinstance(checkpoint, dict):
        for key in ("model_state", "state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, dict):
                return inner
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ConfigError("Checkpoint is neither a state dict nor a dict with 'model_state'.")


@dataclass(frozen=True)
class LoadedModel:
    preset: ModelPreset
    module: nn.Module
    weights_id: str
    """``sha256:<hex>`` of the checkpoint file, or ``random-init``."""


def load_model(preset: ModelPreset, weights: str, *, sha256: str = "") -> LoadedModel:
    """Build the preset's architecture and load ``weights`` into it (eval mode, CPU).
    ``sha256`` pins the checkpoint (``VIDQ_WEIGHTS_SHA256``): any other file is refused."""
    if sha256 and weights == "random":
        raise ConfigError("VIDQ_WEIGHTS_SHA256 pins a checkpoint, but VIDQ_WEIGHTS=random "
                          "loads none; unset one of them.")
    checkpoint_path = resolve_checkpoint(preset, weights)
    if checkpoint_path is None:
        torch.manual_seed(0)
        module = preset.build()
        return LoadedModel(preset, module.eval(), RANDOM_WEIGHTS_ID)
    digest = verify_pinned(preset, checkpoint_path, weights=weights, pinned=sha256)
    module = preset.build()
    try:
        # Tensors and plain containers only: unpickling anything else could run code.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"Cannot read checkpoint {checkpoint_path} as plain tensors (torch.load with "
            f"weights_only=True: {first[:200]}); re-save its state dict with torch.save."
        ) from None
    try:
        module.load_state_dict(extract_state_dict(checkpoint))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"Checkpoint {checkpoint_path} does not fit model {preset.name}: {first}"
        ) from None
    return LoadedModel(preset, module.eval(), "sha256:" + digest)


# (conv, norm) attribute pairs of PyTorchVideo's blocks (stems, bottlenecks, the
# shortcut branch, X3D's projected-pool head): each forward applies the norm right
# after the conv, and skips a norm that is None.
_CONV_NORM_PAIRS = (
    ("conv", "norm"),
    ("conv_a", "norm_a"),
    ("conv_b", "norm_b"),
    ("conv_c", "norm_c"),
    ("branch1_conv", "branch1_norm"),
    ("pre_conv", "pre_norm"),
    ("post_conv", "post_norm"),
)


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode BatchNorm3d into the Conv3d before it (in place, fp32).

    conv then BN is one affine map per output channel, so the folded conv computes
    the same function with one pass over the activations instead of two. It changes
    results by float rounding only (the fold is computed in float64); the fidelity
    tests bound the difference from the seed's unfolded model. Returns how many norms
    were folded.
    """
    folded = 0
    for block in module.modules():
        for conv_name, norm_name in _CONV_NORM_PAIRS:
            conv = getattr(block, conv_name, None)
            norm = getattr(block, norm_name, None)
            if not (isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)):
                continue
            if norm.training or norm.running_mean is None or norm.running_var is None:
                continue
            scale = torch.rsqrt(norm.running_var.double() + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            shift = -norm.running_mean.double() * scale
            if norm.bias is not None:
                shift = shift + norm.bias.double()
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
            weight = conv.weight.double() * scale.view(-1, 1, 1, 1, 1)
            conv.weight.copy_(weight.to(conv.weight.dtype))
            folded_bias = (bias * scale + shift).to(conv.weight.dtype)
            conv.bias = nn.Parameter(folded_bias, requires_grad=False)
            setattr(block, norm_name, None)
            folded += 1
    return folded
