"""The shared core: what the MLX side and the CUDA side both read.

Records and labels, batching, image loading and geometry, alignment, the teacher-cache format, the
checkpoint config, atomic I/O and errors. Only numpy and transformers' tokenizers/processors are
imported here, never `mlx` or `torch` (tests/test_layers.py keeps it so).
"""
