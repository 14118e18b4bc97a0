"""slow_r50: our pipeline against the seed's own, on the same frames and weights.

The seed (the PyTorch Hub usage of slow_r50) runs here as seed/pipeline.py writes it
out: PyTorchVideo's ``EncodedVideo.get_clip``, the seed's transform (its
PyTorchVideo transforms written with the same torch operations), then
``model(inputs[None])`` on ``pytorchvideo.models.hub.slow_r50``. The pretrained
checkpoint cannot be fetched here, so both sides load one checkpoint this test
writes: slow_r50 at its random init, with trained-like batch-norm parameters (see
``randomize_batch_norms``) and the final projection scaled x50. That spreads the
logits over ~22 units, like a trained classifier's, instead of the near-uniform ~1/400
softmax of a random head, so probabilities and top-5 are decided by the network, not
by ties.

Windows: start 0, an off-grid start, the seed's sliding starts i * clip_duration
and our back-padded tail window, on a 24 fps landscape and a 60 fps portrait video.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seed.pipeline import CLIP_DURATION, SeedPipeline
from tests import media
from vidq.sampling import Sampling, Window, plan_windows
from worker.inference import Classifier, cpu_has_fast_bf16
from worker.models import get_preset
from worker.pipeline import classify_many
from worker.plan import Plan
from worker.transforms import clip_views
from worker.video import VideoReader

pytestmark = pytest.mark.slow

HEAD_SCALE = 50.0

INPUT_TOLERANCE = 1e-5
"""Max abs difference of the normalized input tensors (values in ~[-2, 2.5]).
We resize before normalizing (the seed normalizes full frames, then resizes) and
fold /255 into the affine map; bilinear weights sum to 1, so the two orders are
equal in exact arithmetic and differ by float32 rounding only: a few ulps of 2.4e-7.
Measured: <= 9.6e-7. Any real deviation (a frame, a crop offset, mean/std, the
resize size, RGB order) is >= 1e-2."""

LOGIT_TOLERANCE = 1e-4
"""Max abs difference of fp32 logits (spread max - min ~22). Two things differ, both
float32 rounding: the input tensor above (~4e-7 relative), and the fast path's
BatchNorms folded into the convolutions (weights rounded once from a float64 fold,
one rounding less per layer) computed by channels_last_3d kernels with their own
summation order. 50 layers amplify ~1e-7..1e-6 relative rounding by at most
~10-100x. Measured: <= 3.3e-6, with the fold (on an AVX2 CPU) as without it."""

BF16_PROB_TOLERANCE = 2e-2
"""Max abs difference of a clip's softmax, the fast path (BN folded into the convs,
conv weights stored in bf16, bf16 autocast, channels_last_3d) vs the seed's fp32.
bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per op), accumulations
stay fp32; over 50 layers the logit error is ~0.05 of their ~22 spread, which
moves probabilities by ~1e-3..1e-2. Measured: <= 5.9e-3; the bound
leaves room for other oneDNN kernels or CPUs while still catching a wrong dtype
path, a missing normalization or a layout bug (all >= 0.1)."""

BF16_LOGIT_TOLERANCE = 0.25
"""Max abs difference of logits, bf16 fast path vs the seed's fp32 (spread ~22).
Measured: <= 0.045 (0.2% of the spread)."""

FEATURE_TOLERANCE = 1e-5
"""Max abs difference of fp32 pooled features (the 2048 values the head projects to the
logits; 0..0.90 with these weights), vidq's fast path vs the seed model's own pooled
activations: the float32 rounding of the logits' path, without the projection.
Measured: <= 2.4e-7."""

FEATURE_FLOAT16_RELATIVE = 2.0**-11
"""Stored vectors are float16: rounding to nearest moves a value by at most half a
step, 2^-11 of its magnitude (less in float16's subnormal range), on top of the
float32 deviation above."""

# Top-1 must agree on every window. Top-5 may differ only by near-ties: a class in
# our top 5 but not the seed's must have a seed logit within 2 x BF16_LOGIT_TOLERANCE
# of the seed's 5th.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fidelity")


def randomize_batch_norms(model: torch.nn.Module, *, seed: int = 1) -> None:
    """Trained-like BN statistics and affine parameters. PyTorchVideo's init zeroes
    the weight of each residual branch's last BN, which would make every bottleneck
    an identity and leave most of the network untested; and running stats of 0/1
    would make the BN folding of the fast path a no-op."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm3d):
            c = bn.num_features
            low = 0.1 if getattr(bn, "block_final_bn", False) else 0.9  # keep residual growth tame
            bn.weight.data = torch.rand(c, generator=g) * 0.2 + low
            bn.bias.data = torch.randn(c, generator=g) * 0.05
            bn.running_mean.data = torch.randn(c, generator=g) * 0.05
            bn.running_var.data = torch.rand(c, generator=g) * 0.5 + 0.75


def write_test_checkpoint(path: Path) -> Path:
    """The test weights described in the module docstring, as a hub-style ``.pyth``."""
    from pytorchvideo.models.hub import slow_r50

    torch.manual_seed(0)
    model = slow_r50(pretrained=False)
    randomize_batch_norms(model)
    state = model.state_dict()
    state["blocks.5.proj.weight"] = state["blocks.5.proj.weight"] * HEAD_SCALE
    torch.save({"model_state": state}, path)  # the hub's .pyth layout
    return path


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    return write_test_checkpoint(workdir / "SLOW_8x8_R50_test.pyth")


@pytest.fixture(scope="module")
def videos(workdir: Path) -> dict[str, Path]:
    paths = {"24fps": workdir / "landscape_24fps.mp4", "60fps": workdir / "portrait_60fps.mp4"}
    media.make_video(paths["24fps"], seconds=6.5, fps=24, width=320, height=180, seed=3)
    # 256 frames at 60 fps = exactly two spans: two sliding windows, no tail.
    media.make_video(paths["60fps"], seconds=256 / 60, fps=60, width=180, height=320, seed=4)
    return paths


SPAN = get_preset("slow_r50").clip_duration


@pytest.fixture(scope="module")
def windows(videos: dict[str, Path]) -> list[tuple[str, Window]]:
    """(video, window): our sliding plan (starts i * clip_duration plus the tail) and
    two more starts, each checked against the seed at the same float seconds."""
    out = []
    for name, path in videos.items():
        with VideoReader(path) as reader:
            plan = plan_windows(Sampling(strategy="sliding"), reader.info.duration_s, SPAN)
        out += [(name, w) for w in plan]
    starts_24 = [w.start_sec for n, w in out if n == "24fps"]
    assert starts_24[:3] == [i * CLIP_DURATION for i in range(3)]
    out.append(("24fps", Window(0, 0.5, 0.5 + float(SPAN))))
    return out


@pytest.fixture(scope="module")
def seed_outputs(
    checkpoint: Path, videos: dict[str, Path], windows: list[tuple[str, Window]]
) -> list[dict[str, torch.Tensor]]:
    """The seed's input tensor and logits for each window, exactly as the seed computes them."""
    seed = SeedPipeline(checkpoint)
    # The seed's pooled activations: what its head's pool hands to the projection
    # (2048 x 1 x 2 x 2 at 256 px), kept as they are; the test averages the positions.
    pooled: list[torch.Tensor] = []
    seed.model.blocks[5].pool.register_forward_hook(lambda _m, _i, out: pooled.append(out))
    opened = {name: seed.open(path) for name, path in videos.items()}
    out = []
    for name, w in windows:
        clip = seed.clip(opened[name], w.start_sec)
        out.append({"inputs": clip.inputs, "logits": clip.logits, "probs": clip.probs,
                    "pooled": pooled.pop()[0]})
    for video in opened.values():
        video.close()
    return out


@pytest.fixture(scope="module")
def fp32(checkpoint: Path) -> Classifier:
    return Classifier(model="slow_r50", weights=str(checkpoint), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def our_outputs(
    fp32: Classifier, videos: dict[str, Path], windows: list[tuple[str, Window]]
) -> list[dict[str, torch.Tensor]]:
    """Our decode + transform (worker.video, worker.transforms) and our loaded model, fp32."""
    out = []
    for name, w in windows:
        with VideoReader(videos[name]) as reader:
            (clip,) = list(reader.clips([w], num_frames=8))
        views = clip_views(clip.frames, fp32.preset)
        with torch.inference_mode():
            logits = fp32.module(views)
        out.append({"inputs": views[0], "logits": logits[0]})
    return out


def top5(values: torch.Tensor) -> list[int]:
    return values.topk(5).indices.tolist()


def test_input_tensor_matches_the_seeds(
    seed_outputs: list[dict[str, torch.Tensor]], our_outputs: list[dict[str, torch.Tensor]]
) -> None:
    diffs = []
    for seed, ours in zip(seed_outputs, our_outputs):
        assert ours["inputs"].shape == seed["inputs"].shape == (3, 8, 256, 256)
        diffs.append((ours["inputs"] - seed["inputs"]).abs().max().item())
    print(f"input max abs diff per window: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= INPUT_TOLERANCE


def test_fp32_logits_and_top5_match_the_seeds(
    seed_outputs: list[dict[str, torch.Tensor]], our_outputs: list[dict[str, torch.Tensor]]
) -> None:
    diffs, gaps, spread = [], [], []
    for seed, ours in zip(seed_outputs, our_outputs):
        diffs.append((ours["logits"] - seed["logits"]).abs().max().item())
        assert top5(ours["logits"]) == top5(seed["logits"])
        ranked = seed["logits"].sort(descending=True).values
        gaps.append((ranked[:5] - ranked[1:6]).min().item())
        spread.append(ranked[0].item() - ranked[-1].item())
    print(f"fp32 logit max abs diff per window: {[f'{d:.1e}' for d in diffs]}; logit spread "
          f"{min(spread):.1f}..{max(spread):.1f}; smallest gap among the top 6: {min(gaps):.1e}")
    # The top 6 are separated by far more than the tolerance: agreement is meaningful.
    assert min(gaps) > 10 * LOGIT_TOLERANCE
    assert max(diffs) <= LOGIT_TOLERANCE


def test_our_loaded_model_is_the_seeds_model(
    checkpoint: Path, seed_outputs: list[dict[str, torch.Tensor]]
) -> None:
    """Same input tensor -> same logits: the checkpoint loader and the architecture,
    before the fast path folds anything, add no difference of their own."""
    from worker.models import load_model

    module = load_model(get_preset("slow_r50"), str(checkpoint)).module.eval()
    for seed in seed_outputs[:1]:
        with torch.inference_mode():
            logits = module(seed["inputs"][None])[0]
        assert (logits - seed["logits"]).abs().max().item() <= 1e-6


def test_fp32_classify_end_to_end_gives_the_seeds_top5_per_window(
    fp32: Classifier,
    videos: dict[str, Path],
    windows: list[tuple[str, Window]],
    seed_outputs: list[dict[str, torch.Tensor]],
) -> None:
    """The real path: pipelined decode thread, batching, sliding windows."""
    expected = {w.start_sec: s for (name, w), s in zip(windows, seed_outputs) if name == "60fps"}
    (result,) = list(classify_many(fp32, [videos["60fps"]], Sampling(strategy="sliding")))
    assert not isinstance(result, Exception), result
    assert len(result.clips) == len(expected) == 2
    for clip, (start, seed) in zip(result.clips, sorted(expected.items())):
        assert clip.start_sec == round(start, 4)
        assert [t.class_id for t in clip.top] == top5(seed["probs"])
        assert clip.top[0].score == pytest.approx(seed["probs"].max().item(), abs=2e-6)


@pytest.mark.skipif(
    not cpu_has_fast_bf16(),
    reason="this CPU has no AMX/AVX512-BF16: torch emulates bf16 3D convolutions (minutes "
    "per slow_r50 forward), so precision auto is fp32 here, covered by the tests above",
)
def test_bf16_fast_path_stays_within_bounds_of_the_seeds_fp32(
    checkpoint: Path,
    videos: dict[str, Path],
    windows: list[tuple[str, Window]],
    seed_outputs: list[dict[str, torch.Tensor]],
    our_outputs: list[dict[str, torch.Tensor]],
) -> None:
    # "auto" is bf16 on AMX/AVX512-BF16 CPUs: the default path there.
    fast = Classifier(model="slow_r50", weights=str(checkpoint), device="cpu",
                      precision="auto", top_k=400)
    assert fast.precision == "bf16"
    # End to end: the probabilities vidq reports for each sliding window.
    probs: dict[tuple[str, float], torch.Tensor] = {}
    for name, path in videos.items():
        (result,) = list(classify_many(fast, [path], Sampling(strategy="sliding")))
        assert not isinstance(result, Exception), result
        for clip in result.clips:
            p = torch.zeros(400)
            for t in clip.top:
                p[t.class_id] = t.score
            probs[(name, clip.start_sec)] = p
    prob_diffs, logit_diffs, top1_agree, overlaps, swap_margins = [], [], 0, [], []
    for (name, w), seed, ours_in in zip(windows, seed_outputs, our_outputs):
        if w.index == 0:  # the fast module's logits, on our input tensor
            views = ours_in["inputs"][None].contiguous(memory_format=torch.channels_last_3d)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = fast.module(views)[0].float()
            logit_diffs.append((logits - seed["logits"]).abs().max().item())
        ours = probs.get((name, round(w.start_sec, 4)))
        if ours is None:
            continue  # the off-grid start is not in the sliding plan
        ranked = seed["logits"].sort(descending=True)
        for c in set(top5(ours)) - set(ranked.indices[:5].tolist()):  # only near-ties may swap
            swap_margins.append(ranked.values[4].item() - seed["logits"][c].item())
        prob_diffs.append((ours - seed["probs"]).abs().max().item())
        top1_agree += top5(ours)[0] == top5(seed["probs"])[0]
        overlaps.append(len(set(top5(ours)) & set(top5(seed["probs"]))))
    assert len(prob_diffs) == len(windows) - 1
    print(f"bf16 vs seed fp32: max |dp| {max(prob_diffs):.2e}, "
          f"max |dlogit| {max(logit_diffs):.3f}, "
          f"top-1 agree {top1_agree}/{len(prob_diffs)}, top-5 overlap {overlaps}, "
          f"swapped classes' seed logit below the 5th by {[f'{m:.4f}' for m in swap_margins]}")
    assert max(prob_diffs) <= BF16_PROB_TOLERANCE
    assert max(logit_diffs) <= BF16_LOGIT_TOLERANCE
    assert top1_agree == len(prob_diffs)
    assert all(m <= 2 * BF16_LOGIT_TOLERANCE for m in swap_margins)
    assert min(overlaps) >= 3


def test_fp32_features_match_the_seeds_pooled_activations(
    checkpoint: Path,
    videos: dict[str, Path],
    windows: list[tuple[str, Window]],
    seed_outputs: list[dict[str, torch.Tensor]],
) -> None:
    """VIDQ_EMBEDDINGS: the vector vidq keeps per clip is the seed model's pooled
    activation averaged over the positions its projection runs at, in memory (fp32)
    and as stored (float16), through the real pipeline."""
    from pytorchvideo.models.hub import slow_r50

    ours = Classifier(model="slow_r50", weights=str(checkpoint), device="cpu",
                      precision="fp32", embeddings="clip")
    seed_proj = slow_r50(pretrained=False).blocks[5].proj
    seed_proj.load_state_dict({k.removeprefix("blocks.5.proj."): v for k, v in torch.load(
        checkpoint, map_location="cpu")["model_state"].items() if k.startswith("blocks.5.proj")})
    diffs, stored_excess, cosines = [], [], []
    by_start: dict[tuple[str, float], torch.Tensor] = {}
    for name, path in videos.items():
        (result,) = list(classify_many(ours, [path], Sampling(strategy="sliding")))
        assert not isinstance(result, Exception), result
        for clip in result.clips:
            assert clip.embedding is not None
            by_start[(name, clip.start_sec)] = torch.frombuffer(
                bytearray(clip.embedding), dtype=torch.float16).float()
    for (name, w), seed in zip(windows, seed_outputs):
        assert seed["pooled"].shape == (2048, 1, 2, 2)
        seed_feature = seed["pooled"].mean(dim=(1, 2, 3))
        # That vector is the one the seed's projection maps to its logits.
        with torch.inference_mode():
            assert (seed_proj(seed_feature) - seed["logits"]).abs().max() <= 1e-4
        with VideoReader(videos[name]) as reader:
            (clip,) = list(reader.clips([w], num_frames=8))
        _probs, features = ours.forward_with_features(clip_views(clip.frames, ours.preset))
        assert features is not None
        diffs.append((features[0] - seed_feature).abs().max().item())
        stored = by_start.get((name, round(w.start_sec, 4)))
        if stored is None:
            continue  # the off-grid start is not in the sliding plan
        # The stored vector: the float32 bound plus half a float16 step of each value.
        bound = FEATURE_TOLERANCE + FEATURE_FLOAT16_RELATIVE * seed_feature.abs()
        stored_excess.append(((stored - seed_feature).abs() / bound).max().item())
        cosines.append(torch.nn.functional.cosine_similarity(stored, seed_feature, dim=0).item())
    assert len(stored_excess) == len(windows) - 1
    print(f"fp32 feature max abs diff per window: {[f'{d:.1e}' for d in diffs]} (values up "
          f"to {max(s['pooled'].max().item() for s in seed_outputs):.2f}); stored float16 "
          f"vs seed, worst fraction of its bound {max(stored_excess):.2f}, cosine >= "
          f"{min(cosines):.7f}")
    assert max(diffs) <= FEATURE_TOLERANCE
    assert max(stored_excess) <= 1.0


# -- the GPU path (run where CUDA is present: `pytest -m gpu`) -----------------------
# On CUDA the decoders hand over uint8 frames and the transform runs on the device
# (worker/transforms.py frames_to_views), then the model runs in bf16 by default.
# Bounds: the device's bilinear resize and cuDNN's convolutions (TF32 allowed) round
# differently from the CPU's, so the fp32 device path is bounded like the CPU's bf16
# path would be at most; bf16 on the device gets the CPU bf16 bounds above.
GPU_INPUT_TOLERANCE = 1e-4
GPU_FP32_PROB_TOLERANCE = 5e-3
GPU_BF16_PROB_TOLERANCE = 2e-2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_transform_matches_the_cpu_transform(videos: dict[str, Path]) -> None:
    from worker.transforms import frames_to_views

    preset = get_preset("slow_r50")
    with VideoReader(videos["24fps"]) as reader:
        windows = plan_windows(Sampling(strategy="sliding"), reader.info.duration_s,
                               preset.clip_duration)
        clips = list(reader.clips(windows, num_frames=preset.num_frames))
    worst = 0.0
    for clip in clips:
        for crops in (1, 3):
            cpu = clip_views(clip.frames, preset, crops=crops)
            gpu = frames_to_views(torch.from_numpy(clip.frames).cuda(), preset, crops=crops)
            worst = max(worst, (gpu.cpu() - cpu).abs().max().item())
    print(f"\nGPU vs CPU transform: max |diff| {worst:.2e} (bound {GPU_INPUT_TOLERANCE:g})")
    assert worst <= GPU_INPUT_TOLERANCE


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision,bound", [("fp32", GPU_FP32_PROB_TOLERANCE),
                                             ("bf16", GPU_BF16_PROB_TOLERANCE)])
@pytest.mark.parametrize("decoders", ["threads", "processes"])
def test_gpu_pipeline_matches_the_cpu_fp32_pipeline(
    checkpoint: Path, fp32: Classifier, videos: dict[str, Path], precision: str, bound: float,
    decoders: str
) -> None:
    gpu = Classifier(model="slow_r50", weights=str(checkpoint), device="cuda",
                     precision=precision)
    sampling = Sampling(strategy="sliding")
    paths = list(videos.values())
    cpu_results = list(classify_many(fp32, paths, sampling))
    gpu_results = list(classify_many(gpu, paths, sampling, plan=Plan.build(
        on_gpu=True, decoder_count=2, decoder_kind=decoders)))
    worst, same_top1 = 0.0, 0
    for ours, ref in zip(gpu_results, cpu_results):
        assert not isinstance(ours, Exception) and not isinstance(ref, Exception)
        for a, b in zip(ours.clips, ref.clips):
            same_top1 += a.top[0].class_id == b.top[0].class_id
            scores_b = {t.class_id: t.score for t in b.top}
            worst = max(worst, *(abs(t.score - scores_b.get(t.class_id, 0.0)) for t in a.top))
    n = sum(len(r.clips) for r in cpu_results)
    print(f"\nGPU {precision} vs CPU fp32: top-1 {same_top1}/{n}, max |dp| {worst:.2e}")
    assert same_top1 == n
    assert worst <= bound
