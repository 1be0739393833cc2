"""PEFT adapter names both sides agree on: which LM projections get LoRA, and the adapter file names."""

from __future__ import annotations

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lm_target_regex(targets: tuple[str, ...] | list[str]) -> str:
    """PEFT target regex: the LM's projections only (SigLIP's attention shares the q/k/v names)."""
    return r".*language_model.*\.(" + "|".join(targets) + r")$"
