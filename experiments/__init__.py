"""The studies and proofs behind the figures in docs/: `python -m experiments.<name>` from the repository root.

Not installed (pyproject's packages.find leaves it out): users run the library; these drive it, each through
the one step runner (experiments/steps.py). They may import bonsai_mlx, train_cuda and the CLIs; nothing imports
them (tests/test_layers.py)."""
