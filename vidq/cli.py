"""The ``vidq`` command. Subcommands import their heavy halves lazily: a producer
host never imports torch."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import click

from vidq.errors import VidqError
from vidq.settings import Settings


def fail(message: str) -> None:
    """One line on stderr, no traceback."""
    click.echo(f"vidq: error: {message}", err=True)


def warn(message: str) -> None:
    click.echo(f"vidq: warning: {message}", err=True)


def run_cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a VidqError into one line and exit status 2 (bad usage/config)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VidqError as exc:
            fail(exc.message)
            sys.exit(2)

    return wrapper


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose which clips of a video are classified."""
    options = [
        click.option("--model", default=None, help="Model preset (default slow_r50; VIDQ_MODEL)."),
        click.option(
            "--strategy",
            type=click.Choice(["single", "uniform", "sliding"]),
            default="single",
            show_default=True,
            help="single: one clip at --start-sec (the seed's); uniform: --clips evenly "
            "spaced; sliding: windows --stride seconds apart over the whole video.",
        ),
        click.option("--clips", type=click.IntRange(1, 1000), default=10, show_default=True),
        click.option("--stride", type=click.FloatRange(min=0.01), default=None,
                     help="Seconds between sliding windows (default: one clip span)."),
        click.option("--start-sec", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--crops", type=click.Choice(["1", "3"]), default="1", show_default=True,
                     help="3 = left/centre/right crops, as in the published 3x10 eval."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vidq")
def main() -> None:
    """vidq: classify videos with PyTorchVideo, locally or across a Celery cluster."""


@main.command()
@click.argument("paths", nargs=-1, required=True)
@sampling_options
@click.option("--weights", default=None, help="pretrained | PATH | random (VIDQ_WEIGHTS).")
@click.option("--device", default=None, help="auto | cpu | cuda[:N] (VIDQ_DEVICE).")
@click.option("--precision", default=None, help="auto | fp32 | bf16 | fp16 (VIDQ_PRECISION).")
@click.option("--batch-size", type=int, default=None, help="Clips per forward pass.")
@click.option("--top-k", type=click.IntRange(1, 400), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per video.")
@run_cli
def classify(
    paths: tuple[str, ...],
    model: str | None,
    strategy: str,
    clips: int,
    stride: float | None,
    start_sec: float,
    crops: str,
    weights: str | None,
    device: str | None,
    precision: str | None,
    batch_size: int | None,
    top_k: int | None,
    as_json: bool,
) -> None:
    """Classify video files in this process (no Redis, no database)."""
    from vidq.media import check_video_path
    from worker.inference import Classifier
    from worker.video import Sampling

    settings = Settings.from_env(
        model=model, weights=weights, device=device, precision=precision,
        batch_size=batch_size, top_k=top_k,
    )
    sampling = Sampling(
        strategy=strategy, clips=clips, stride_s=stride, start_sec=start_sec, crops=int(crops)
    )
    failures = 0
    good: list[str] = []
    for raw in paths:
        try:
            good.append(str(check_video_path(
                raw, media_roots=settings.media_roots, max_file_bytes=settings.max_file_bytes
            )))
        except VidqError as exc:
            fail(exc.message)
            failures += 1
    if good:
        classifier = Classifier.from_settings(settings)
        if classifier.weights_id == "random-init":
            warn("random weights (--weights random): predictions are meaningless.")
        t0 = time.perf_counter()
        n_clips = 0
        for result in classifier.classify_many(good, sampling):
            if isinstance(result, VidqError):
                fail(result.message)
                failures += 1
                continue
            n_clips += len(result.clips)
            if as_json:
                click.echo(json.dumps(result.to_json()))
            else:
                labels = ", ".join(f"{t.label} ({t.score:.3f})" for t in result.top)
                click.echo(f"{result.path}: Top {len(result.top)} predicted labels: {labels}")
        elapsed = time.perf_counter() - t0
        if n_clips:
            click.echo(
                f"vidq: {n_clips} clips in {elapsed:.2f}s ({n_clips / elapsed:.2f} clips/s, "
                f"{classifier.precision} on {classifier.device}, weights {classifier.weights_id[:19]})",
                err=True,
            )
    if failures:
        sys.exit(1)


@main.command()
def models() -> None:
    """List the model presets."""
    from worker.models import PRESETS

    for p in PRESETS.values():
        click.echo(
            f"{p.name:10s} {p.num_frames}x{p.sampling_rate} frames, side {p.side_size}, "
            f"crop {p.crop_size}, clip {float(p.clip_duration):.3f}s  {p.checkpoint_url}"
        )


if __name__ == "__main__":
    main()
