"""Pico's configuration: the Hugging Face Llava `config.json`, read and written losslessly."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from bonsai_mlx.core.errors import BonsaiError


class ConfigError(BonsaiError, ValueError):
    """A config.json that cannot describe a Pico."""


def pick_fields(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False
    model_type: str = "siglip_vision_model"

    def __post_init__(self) -> None:
        # SigLIP's attention-pooling head: Llava never calls it and strict loaders (mlx-vlm) refuse its
        # tensors, so a Pico never has one; a checkpoint that kept it is read with those tensors dropped.
        self.vision_use_head = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    rope_scaling: dict | None = None
    model_type: str = "qwen2"
    head_dim: int | None = None  # set when heads were pruned: then it is not hidden_size / heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def mlx_lm_args(self) -> dict:
        """The kwargs for `mlx_lm.models.qwen2.ModelArgs` (which has no head_dim: Pico sets it itself)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "head_dim"}
        if d["rope_scaling"] and d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type")) == "default":
            d["rope_scaling"] = None
        return d


@dataclass
class PicoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 151646
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "full"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)  # everything, so a round trip loses nothing

    @property
    def num_image_tokens(self) -> int:
        n = self.vision.grid**2
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> PicoConfig:
        if d.get("model_type") != "llava":
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'llava'")
        vd, td = d.get("vision_config"), d.get("text_config")
        if not isinstance(vd, dict) or vd.get("model_type") not in ("siglip_vision_model", "siglip"):
            raise ConfigError(f"{source}: vision_config.model_type must be 'siglip_vision_model'")
        if not isinstance(td, dict) or td.get("model_type") != "qwen2":
            raise ConfigError(f"{source}: text_config.model_type must be 'qwen2'")
        td = dict(td)
        # transformers 5.x keeps rope_theta only in rope_parameters; 4.x and llava-hf at the top.
        rp = td.get("rope_parameters") or {}
        if "rope_theta" in rp:
            td["rope_theta"] = rp["rope_theta"]
        if "tie_word_embeddings" not in td and "tie_word_embeddings" in d:
            td["tie_word_embeddings"] = d["tie_word_embeddings"]
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"{source}: vision_feature_select_strategy must be 'default' or 'full'")
        top = pick_fields(cls, d)
        top.pop("raw", None)
        top.pop("vision", None)
        top.pop("text", None)
        top["vision_feature_select_strategy"] = strategy
        top.setdefault("vision_feature_layer", -2)  # transformers' LlavaConfig default
        return cls(
            vision=VisionConfig(**pick_fields(VisionConfig, vd)),
            text=TextConfig(**pick_fields(TextConfig, td)),
            raw=copy.deepcopy(d),
            **top,
        )

    def to_dict(self) -> dict:
        """The config.json, in the llava-hf spelling every consumer reads (both rope fields)."""
        d = copy.deepcopy(self.raw)
        d.setdefault("architectures", ["LlavaForConditionalGeneration"])
        d["model_type"] = "llava"
        vd = d.setdefault("vision_config", {})
        vd.update({f.name: getattr(self.vision, f.name) for f in fields(self.vision)})
        td = d.setdefault("text_config", {})
        td.update({f.name: getattr(self.text, f.name) for f in fields(self.text)})
        if td.get("head_dim") is None:
            td.pop("head_dim", None)  # transformers reads a present None as the head size
        rp = td.get("rope_parameters") or {"rope_type": "default"}
        rp["rope_theta"] = self.text.rope_theta
        td["rope_parameters"] = rp
        for name in (
            "image_token_index",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "projector_hidden_act",
            "multimodal_projector_bias",
        ):
            d[name] = getattr(self, name)
        d["tie_word_embeddings"] = self.text.tie_word_embeddings
        d["image_seq_length"] = self.num_image_tokens
        if self.quantization:
            d["quantization"] = dict(self.quantization)
        else:
            d.pop("quantization", None)
        return d

    @classmethod
    def load(cls, model_dir: str | Path) -> PicoConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (expected a Hugging Face Llava model directory)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d, source=str(path))

    def save(self, model_dir: str | Path) -> None:
        from bonsai_mlx.core.io import atomic_write_text

        atomic_write_text(Path(model_dir) / "config.json", json.dumps(self.to_dict(), indent=2) + "\n")
