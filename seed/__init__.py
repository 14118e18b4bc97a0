"""The seed: the PyTorch Hub usage of slow_r50 that vidq reproduces (seed/pipeline.py).

A reference for the fidelity tests and the ``seed`` benchmark; not part of the
installed package."""
