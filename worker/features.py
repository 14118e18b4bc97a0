"""The model's pooled features, captured in the forward pass that computes its logits.

Every preset ends in PyTorchVideo's ``ResNetBasicHead``: ``pool -> dropout -> proj ->
activation -> output_pool``, with the activation removed (worker/models.py).

- slow_r50: ``pool`` is ``AvgPool3d(8, 7, 7)`` over the last stage's 2048 x 8 x 8 x 8
  map (256 px crops), leaving 2048 x 1 x 2 x 2.
- X3D: ``pool`` is a ``ProjectedPool`` (1x1x1 conv 192 -> 432, BN, ReLU, average pool,
  1x1x1 conv 432 -> 2048, ReLU), leaving 2048 x 1 x 2 x 2 for x3d_xs.

``proj`` (a Linear) runs at each remaining position and ``output_pool`` averages the
logits. ``proj`` is affine, so with ``f`` the mean of the pooled map over those positions,
logits = proj(f) (up to float rounding): ``f`` is the vector the final projection maps to
the labels, 2048 values, and it is what vidq keeps (dropout is the identity in eval).

It is captured by a forward hook on the head's ``pool`` module during the one forward
pass, so batches, precisions and layouts need nothing of their own:

- fp32, and bf16/fp16 under autocast: the hook sees the pool's output in the compute
  dtype and keeps it as float32;
- int8: the FX-quantized graph keeps the head in float (worker/quantize.py) and still
  calls the same ``blocks.5.pool`` module, so the features are the float pooling of the
  dequantized int8 trunk, with the same int8 deviation as the logits;
- ``torch.compile``: the hook is registered before compiling, and dynamo traces it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn


def head_pool_name(module: nn.Module) -> str:
    """Qualified name of the head's pool module in an eager PyTorchVideo ``Net``. Taken
    before quantizing: the FX graph keeps the name, but not the ``blocks`` list."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(blocks[-1], "pool"):
        raise TypeError(f"{type(module).__name__} has no PyTorchVideo head with a pool")
    return f"blocks.{len(blocks) - 1}.pool"


class PooledFeatures:
    """Keeps the pooled features of each forward pass of ``module``: (views, C) float32.

    One capture serves one forward at a time: ``lock`` is held from ``reset`` to
    ``take`` by the caller (the model loop is one thread, but tests and benchmarks may
    run two pipelines on one classifier)."""

    def __init__(self, module: nn.Module, pool_name: str) -> None:
        self.lock = threading.Lock()
        self._kept: list[torch.Tensor] = []
        self._handle = module.get_submodule(pool_name).register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        # Mean over the positions left after pooling (t, h, w): see the module docstring.
        self._kept.append(output.float().mean(dim=(2, 3, 4)))

    def reset(self) -> None:
        """Forget a capture a failed forward (out of memory after the pool) left behind."""
        self._kept.clear()

    def take(self) -> torch.Tensor:
        """The features of the forward pass just run."""
        if len(self._kept) != 1:
            raise RuntimeError(f"expected one head pass per forward, saw {len(self._kept)}")
        features = self._kept.pop()
        return features

    def remove(self) -> None:
        self._handle.remove()
