"""SigLIP vision tower in MLX, parameter names as in Hugging Face's `SiglipVisionModel`."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from bonsai_mlx.core.config import VisionConfig


def gelu_tanh(x: mx.array) -> mx.array:
    """`gelu_pytorch_tanh`, written out so it matches PyTorch to float rounding."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": nn.gelu,
    "gelu_new": gelu_tanh,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # MLX convs are channels-last: weight (out, kh, kw, in); checkpoints store (out, in, kh, kw).
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid**2, cfg.hidden_size)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        x = self.patch_embedding(pixels_nhwc)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[1] != self.position_embedding.weight.shape[0]:
            raise ValueError(
                f"image gives {x.shape[1]} patches but the vision tower has "
                f"{self.position_embedding.weight.shape[0]} positions: resize images to the configured image_size"
            )
        return x + self.position_embedding.weight


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head. Llava never calls it; kept so checkpoints round-trip."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.probe = mx.zeros((1, 1, d))
        self.attention = nn.Module()
        self.attention.in_proj_weight = mx.zeros((3 * d, d))
        self.attention.in_proj_bias = mx.zeros((3 * d,))
        self.attention.out_proj = nn.Linear(d, d)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.vision_use_head:
            self.head = PoolingHead(cfg)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)

    def hidden_states(self, pixel_values: mx.array, layers: list[int]) -> list[mx.array]:
        """HF `hidden_states[i]` for each requested i (0 = embeddings, -1 = last layer, pre post-norm).

        `pixel_values` is NCHW as processors emit it. Layers past the deepest one asked for are skipped.
        """
        n = len(self.vision_model.encoder.layers)
        want = sorted({i % (n + 1) for i in layers})
        # the tower's own dtype: float32 pixels would promote a half-precision tower to float32 throughout
        pixels = pixel_values.astype(self.vision_model.embeddings.patch_embedding.weight.dtype)
        x = self.vision_model.embeddings(pixels.transpose(0, 2, 3, 1))
        out = {0: x}
        for i, layer in enumerate(self.vision_model.encoder.layers[: want[-1]], start=1):
            x = layer(x)
            out[i] = x
        return [out[i % (n + 1)] for i in layers]
