"""The studies and proofs behind the figures in docs/: `python -m experiments.<name>` from the repository root.

Not installed (pyproject's packages.find leaves it out): users run the library; these drive it. The drivers of
many steps (recipe, shapes_kd, pca_variance, distill_vision, embedded_sweep) share one step runner
(experiments/steps.py). They may import bonsai_mlx, train_cuda and the CLIs; nothing imports them
(tests/test_layers.py)."""
