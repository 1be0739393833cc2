"""Experiments that produce the figures in docs/ (each one command, each step its own process)."""
