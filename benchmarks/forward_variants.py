"""The model forward as the seed runs it against vidq's fast path, in one process.

    python benchmarks/forward_variants.py [--model slow_r50] [--precision fp32] [--rounds 5]

seed: the hub model as built (eager, contiguous), the seed's ``model(inputs[None])``.
vidq: ``Classifier.forward`` (BatchNorm folded, channels_last_3d, and at bf16/fp16
the weights stored in that dtype). Rounds alternate seed, vidq, so a noisy moment
on a shared machine hits both; each round prints both rates and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rate(fn, x, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return n * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="slow_r50")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3, help="forward passes per side per round")
    args = ap.parse_args()

    import torch

    from worker.inference import Classifier
    from worker.models import load_model

    fast = Classifier(model=args.model, weights="random", device=args.device,
                      precision=args.precision)
    seed = load_model(fast.preset, "random").module.eval().to(fast.device)
    p = fast.preset
    x = torch.randn(fast.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)

    def seed_forward(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(seed(v.to(fast.device)), dim=1).cpu()

    for f in (seed_forward, fast.forward):  # warm-up: allocator, oneDNN primitives
        f(x)
    print(f"{args.model}, batch {fast.batch_size}, {fast.device}, torch threads "
          f"{torch.get_num_threads()}; seed fp32 eager vs vidq {fast.precision} fast path")
    ratios = []
    for r in range(args.rounds):
        s = rate(seed_forward, x, args.iters)
        v = rate(fast.forward, x, args.iters)
        ratios.append(v / s)
        print(f"  round {r + 1}: seed {s:6.3f} clips/s (baseline)   vidq {v:6.3f} clips/s   "
              f"{v / s:4.2f}x", flush=True)
    print(f"vidq forward / seed forward: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
