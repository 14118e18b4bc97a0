"""Decode-side effect of skipping unused frames, and its effect end to end.

    python benchmarks/decode.py [--seconds 30] [--rounds 8] [--dir /tmp/vidq-decode-bench]

Corpus: one H.264 file per size (360p, 720p, 1080p) written with libx264's own
defaults (preset medium: 3 B-frames, b-pyramid, 250-frame GOP), moving shapes plus
fresh per-frame noise of +-``--noise`` (benchmarks/corpus.py); kept in ``--dir``
between runs. How many frames nothing references is the encoder's choice: with
the other benchmarks' +-12 grain, x264 writes few B-frames at 360p (39 of 240);
with +-4 (the default here), about 45% of frames, as on ordinary camera video.

Decode side: every sliding window of the file decoded (``VideoReader.clips`` with
FFmpeg's own threads, as vidq's decoders run it) and made into the model's input
as each kind of host does it, in two passes of their own: a CPU host's decoder
transforms each clip (``clip_views`` on one thread); a GPU host's decoder only
copies the clip's RGB frames into one uint8 buffer (its pinned memory or shared
slot, worker/decoders.py) and the GPU transforms them. Skipping is on and off in
alternating rounds, so a noisy moment on a shared machine hits both; each round
prints both rates and their ratios, and the summary the median ratio per size,
for slow_r50's sampling (8 of 64 frames) and x3d_xs's (4 of 48). Ratios of wall
time and of the process's CPU time (all decoder threads: the work saved, which
other jobs on a shared machine disturb less). Then the same with decoders on every
core (``--decoders``, one process per core by default, each with one FFmpeg
thread, as the pipeline runs several): the windows per wall second of all of them
together, which is a saturated host's decode throughput.

End to end: ``Classifier.classify_many`` over the corpus with on/off alternating,
for x3d_xs and slow_r50 with random weights (the speed of a forward does not
depend on the weights), fp32 on CPU unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}


def corpus(directory: Path, seconds: float, noise: int) -> dict[str, Path]:
    from benchmarks.corpus import make_video

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (width, height) in SIZES.items():
        path = directory / f"default_x264_{name}_{seconds:g}s_noise{noise}.mp4"
        if not path.exists():
            t = time.perf_counter()
            tmp = path.with_suffix(".part.mp4")
            make_video(tmp, frames=int(seconds * 30), width=width, height=height, options={},
                       noise=noise)
            tmp.rename(path)
            print(f"wrote {path.name} in {time.perf_counter() - t:.0f}s", flush=True)
        out[name] = path
    return out


def decode_rate(path: Path, *, model: str, skip: bool, host: str,
                threads: int = 0) -> tuple[float, float, float]:
    """Windows per second over every sliding window, decoded and prepared as a ``host``
    ("cpu" or "gpu") host's decoder prepares them, with ``threads`` FFmpeg threads (0:
    FFmpeg's choice): (per wall s, per CPU s, share of packets decoded)."""
    import numpy as np

    from vidq.sampling import Sampling, plan_windows
    from worker.models import get_preset
    from worker.transforms import clip_views
    from worker.video import VideoReader

    preset = get_preset(model)
    slot: np.ndarray | None = None
    t, cpu = time.perf_counter(), time.process_time()
    with VideoReader(path, skip_unused_frames=skip, threads=threads) as reader:
        windows = plan_windows(Sampling(strategy="sliding"), reader.info.duration_s, preset.clip_duration)
        n = 0
        for clip in reader.clips(windows, num_frames=preset.num_frames):
            if host == "cpu":
                clip_views(clip.rgb, preset)
            else:
                shape = (len(clip.rgb), *clip.rgb[0].shape)
                if slot is None or slot.shape != shape:
                    slot = np.empty(shape, np.uint8)
                np.stack(clip.rgb, out=slot)  # as a decoder process fills its slot
            n += 1
        stats = reader.stats
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return n / wall, n / cpu, stats.decoded / stats.packets


def _one_core() -> None:
    import torch

    torch.set_num_threads(1)


def _windows(path: Path, *, model: str, skip: bool, host: str) -> float:
    """A decoder process's pass (one FFmpeg thread): its windows."""
    rate, _cpu, _share = decode_rate(path, model=model, skip=skip, host=host, threads=1)
    return rate


class EveryCore:
    """One decoder process per core, each with one FFmpeg thread, as the pipeline runs
    several decoders (worker/pipeline.py: a core's share of threads each): windows per
    wall second of all of them together, each decoding the file once. The processes
    are started (and their imports done) before any pass is timed."""

    def __init__(self, processes: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_one_core)
        list(self.pool.map(time.sleep, [0.5] * processes))

    def rate(self, path: Path, *, model: str, skip: bool, host: str) -> float:
        from vidq.sampling import Sampling, plan_windows
        from worker.models import get_preset
        from worker.video import VideoReader

        with VideoReader(path) as reader:
            windows = len(plan_windows(Sampling(strategy="sliding"), reader.info.duration_s,
                                       get_preset(model).clip_duration))
        t = time.perf_counter()
        futures = [self.pool.submit(_windows, path, model=model, skip=skip, host=host)
                   for _ in range(self.processes)]
        for future in futures:
            future.result()
        return windows * self.processes / (time.perf_counter() - t)

    def close(self) -> None:
        self.pool.shutdown()


def end_to_end_rate(clf: object, paths: list[Path], *, skip: bool) -> tuple[float, float]:
    """(clips per wall s, clips per CPU s of the whole process: model and decoder)."""
    clf.skip_unused_frames = skip  # type: ignore[attr-defined]
    t, cpu = time.perf_counter(), time.process_time()
    clips = sum(len(r.clips) for r in clf.classify_many(paths))  # type: ignore[attr-defined, misc]
    return clips / (time.perf_counter() - t), clips / (time.process_time() - cpu)


def alternate(label: str, rounds: int, measure, names: list[str]) -> str:  # type: ignore[no-untyped-def]
    """Rounds of on/off (order swapped each round); the median ratios as text. One
    discarded pass of each first: whichever ran first would otherwise pay for the cold
    file and allocator (a first round of 0.65-0.95x seen for that reason). ``names``:
    what the leading values ``measure`` returns are; one more is a share decoded."""
    ratios: list[list[float]] = [[] for _ in names]
    measure(True), measure(False)
    for i in range(rounds):
        if i % 2 == 0:
            on, off = measure(True), measure(False)
        else:
            off, on = measure(False), measure(True)
        measured = min(len(on), len(names))
        for k in range(measured):
            ratios[k].append(on[k] / off[k])
        line = f"  {label} round {i + 1}: skip on {on[0]:.2f}/s, off {off[0]:.2f}/s, " + ", ".join(
            f"{names[k]} {ratios[k][-1]:.2f}x" for k in range(measured)
        )
        if len(on) > len(names):
            line += f"; decoded {on[-1]:.0%} of packets"
        print(line, flush=True)
    return ", ".join(
        f"{name} {statistics.median(r):.2f}x" for name, r in zip(names, ratios) if r
    )


def decode_side(files: dict[str, Path], *, rounds: int, every: EveryCore) -> list[tuple[str, str]]:
    """Alternating rounds per sampling and size; (label, median ratios) of each."""
    print("decode side, windows/s (every sliding window; rates are the CPU host's):")
    summary = []
    for model in ("slow_r50", "x3d_xs"):
        for name, path in files.items():
            def measure(skip: bool, path: Path = path, model: str = model) -> tuple[float, ...]:
                cpu_wall, cpu_cpu, share = decode_rate(path, model=model, skip=skip, host="cpu")
                gpu_wall, gpu_cpu, _ = decode_rate(path, model=model, skip=skip, host="gpu")
                rates = [every.rate(path, model=model, skip=skip, host=h) for h in ("cpu", "gpu")]
                return cpu_wall, cpu_cpu, gpu_wall, gpu_cpu, *rates, share

            summary.append((f"decode {model} {name}", alternate(
                f"{model} {name}", rounds, measure,
                ["CPU host wall", "CPU", "GPU host wall", "CPU",
                 f"{every.processes} decoders CPU host", "GPU host"])))
    every.close()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="length of each corpus file (8 s files hold 3-4 windows: rounds too short)")
    ap.add_argument("--rounds", type=int, default=8, help="alternating on/off rounds (decode side)")
    ap.add_argument("--e2e-rounds", type=int, default=2, help="alternating rounds end to end")
    ap.add_argument("--noise", type=int, default=4, help="per-frame noise amplitude of the corpus")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/vidq-decode-bench"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoders", type=int, default=0,
                    help="decoder processes of the every-core passes (default: one per core)")
    ap.add_argument("--skip-e2e", action="store_true", help="decode side only")
    ap.add_argument("--e2e-only", action="store_true", help="end to end only")
    args = ap.parse_args()

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # vidq's decode thread runs its transforms on one core
    files = corpus(args.dir, args.seconds, args.noise)
    summary: list[tuple[str, str]] = []
    if not args.e2e_only:
        summary += decode_side(files, rounds=args.rounds,
                               every=EveryCore(args.decoders or os.cpu_count() or 1))
    if not args.skip_e2e:
        from worker.inference import Classifier

        torch.set_num_threads(threads)
        print("end to end, clips/s (Classifier.classify_many, random weights, fp32):")
        for model in ("x3d_xs", "slow_r50"):
            clf = Classifier(model=model, weights="random", device=args.device, precision="fp32")
            paths = list(files.values())

            def measure_e2e(
                skip: bool, clf: Classifier = clf, paths: list[Path] = paths
            ) -> tuple[float, float]:
                return end_to_end_rate(clf, paths, skip=skip)

            summary.append((f"end to end {model}", alternate(model, args.e2e_rounds, measure_e2e, ["wall", "CPU"])))
    print("median ratio, skip on / skip off:")
    for label, ratio in summary:
        print(f"  {label}: {ratio}")


if __name__ == "__main__":
    main()
