"""Model presets and the fast path's model rewrites (worker/models.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vidq.errors import ConfigError
from worker.models import (
    PRESETS,
    RANDOM_WEIGHTS_ID,
    extract_state_dict,
    fold_batch_norms,
    get_preset,
    load_model,
)


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so folding has something to fold."""
    g = torch.Generator().manual_seed(0)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm3d):
            c = bn.num_features
            bn.weight.data = torch.rand(c, generator=g) * 0.5 + 0.2
            bn.bias.data = torch.randn(c, generator=g) * 0.1
            bn.running_mean.data = torch.randn(c, generator=g) * 0.1
            bn.running_var.data = torch.rand(c, generator=g) + 0.5
    return module.eval()


@pytest.mark.parametrize("name", ["x3d_xs", "x3d_s"])
def test_x3d_presets_return_logits_not_probabilities(name: str) -> None:
    # The hub's X3D head ends in a Softmax; the classifier applies its own.
    preset = get_preset(name)
    module = preset.build().eval()
    module.blocks[-1].proj.bias.data[3] = 50.0
    x = torch.randn(1, 3, preset.num_frames, preset.crop_size, preset.crop_size)
    with torch.inference_mode():
        out = module(x)
    assert out.shape == (1, 400)
    assert out[0, 3].item() > 40  # a logit; a softmax would be <= 1
    assert torch.softmax(out, dim=1)[0, 3].item() > 0.99


@pytest.mark.parametrize("name", ["x3d_xs", pytest.param("slow_r50", marks=pytest.mark.slow)])
def test_folding_batch_norms_keeps_the_function(name: str) -> None:
    preset = get_preset(name)
    torch.manual_seed(0)
    module = randomized(preset.build())
    folded = copy.deepcopy(module)
    n = fold_batch_norms(folded)
    bns_before = sum(isinstance(m, torch.nn.BatchNorm3d) for m in module.modules())
    bns_after = sum(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert n > 0 and bns_after == bns_before - n
    if name == "slow_r50":
        assert bns_after == 0  # every BN of slow_r50 follows a Conv3d
    x = torch.randn(1, 3, preset.num_frames, preset.crop_size, preset.crop_size)
    with torch.inference_mode():
        want, got = module(x), folded(x)
    spread = (want.max() - want.min()).item()
    assert spread > 0
    assert (got - want).abs().max().item() <= 1e-4 * max(spread, 1.0)


def test_folding_skips_batch_norms_in_training_mode() -> None:
    module = randomized(get_preset("x3d_xs").build()).train()
    assert fold_batch_norms(module) == 0


def test_random_weights_are_reproducible_and_marked() -> None:
    a = load_model(get_preset("x3d_xs"), "random")
    b = load_model(get_preset("x3d_xs"), "random")
    assert a.weights_id == b.weights_id == RANDOM_WEIGHTS_ID
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_checkpoint_layouts() -> None:
    sd = {"w": torch.zeros(1)}
    assert extract_state_dict({"model_state": sd}) is sd
    assert extract_state_dict({"state_dict": sd}) is sd
    assert extract_state_dict(sd) is sd
    with pytest.raises(ConfigError):
        extract_state_dict({"epoch": 3})
    with pytest.raises(ConfigError):
        extract_state_dict([1, 2])


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("slow_r51")
    assert all(name in info.value.message for name in PRESETS)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (not as torch reads them)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_precision_auto_follows_the_cpu_and_the_preset() -> None:
    from worker.inference import resolve_precision

    cpu = torch.device("cpu")
    assert get_preset("slow_r50").cpu_bf16 and not get_preset("x3d_xs").cpu_bf16
    # Stated independently of the code: bf16 where the CPU has AMX tiles or
    # AVX512-BF16 instructions, fp32 elsewhere.
    expected = "bf16" if {"amx_tile", "avx512_bf16"} & cpu_flags() else "fp32"
    assert resolve_precision("auto", cpu, cpu_bf16=True) == expected
    assert resolve_precision("auto", cpu, cpu_bf16=False) == "fp32"
    assert resolve_precision("fp32", cpu, cpu_bf16=True) == "fp32"
