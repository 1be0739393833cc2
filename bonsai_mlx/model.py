"""Pico: SigLIP tower -> 2-layer GELU projector -> Qwen2 (mlx-lm), with image features merged at <image>."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.rope_utils import initialize_rope

from bonsai_mlx import device, fastmath, quantize
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.quantize import DEQUANT_ROWS
from bonsai_mlx.vision import VisionTower

ACT = {"gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx, "relu": nn.relu, "silu": nn.silu}


def select_features(hidden_states: list[mx.array], strategy: str) -> mx.array:
    """Tower states -> projector input: "default" drops the first (CLS) token, as llava-hf does; "full" keeps all
    (SigLIP has no CLS token); several layers are concatenated on the channel axis."""
    hs = [h[:, 1:] for h in hidden_states] if strategy == "default" else hidden_states
    return hs[0] if len(hs) == 1 else mx.concatenate(hs, axis=-1)


class Projector(nn.Module):
    def __init__(self, cfg: PicoConfig):
        super().__init__()
        n_layers = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(cfg.vision.hidden_size * n_layers, cfg.text.hidden_size, bias=bias)
        self.act = ACT[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


def _resize_heads(attn: qwen2.Attention, args: qwen2.ModelArgs, head_dim: int) -> None:
    """mlx-lm's Qwen2 derives head_dim from hidden_size; a head-pruned checkpoint states its own."""
    dim, nq, nkv = args.hidden_size, attn.n_heads, attn.n_kv_heads
    attn.scale = head_dim**-0.5
    attn.q_proj = nn.Linear(dim, nq * head_dim, bias=True)
    attn.k_proj = nn.Linear(dim, nkv * head_dim, bias=True)
    attn.v_proj = nn.Linear(dim, nkv * head_dim, bias=True)
    attn.o_proj = nn.Linear(nq * head_dim, dim, bias=False)
    attn.rope = initialize_rope(
        head_dim, args.rope_theta, args.rope_traditional, args.rope_scaling, args.max_position_embeddings
    )


class Pico(nn.Module):
    def __init__(self, config: PicoConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        args = qwen2.ModelArgs.from_dict(config.text.mlx_lm_args())
        self.language_model = qwen2.Model(args)
        if config.text.attention_head_dim != config.text.hidden_size // config.text.num_attention_heads:
            for layer in self.language_model.layers:
                _resize_heads(layer.self_attn, args, config.text.attention_head_dim)
        fastmath.use_fast_silu(self.language_model)  # CPU backend: SiLU in arithmetic ops (exact, ~4x faster)

    # -- vision -------------------------------------------------------------------------------
    def vision_features(self, pixel_values: mx.array, tower_grad: bool = True) -> mx.array:
        """(num_images, C, H, W) -> what the projector reads: the configured tower layers, tokens selected by the
        strategy. `tower_grad=False`: no gradient flows into a frozen tower (the projector's still does)."""
        cfg = self.config
        fl = cfg.vision_feature_layer
        hs = self.vision_tower.hidden_states(pixel_values, [fl] if isinstance(fl, int) else list(fl))
        if not tower_grad:
            hs = [mx.stop_gradient(h) for h in hs]
        return select_features(hs, cfg.vision_feature_select_strategy)

    def image_features(self, pixel_values: mx.array, tower_grad: bool = True) -> mx.array:
        """(num_images, C, H, W) -> (num_images, num_image_tokens, text_hidden): the one image-features path of
        inference, training and distillation."""
        return self.multi_modal_projector(self.vision_features(pixel_values, tower_grad))

    # -- text ---------------------------------------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.model.embed_tokens

    def embed(self, input_ids: mx.array, image_features: mx.array | None = None, check: bool = True) -> mx.array:
        """Token embeddings with image features placed, in order, at the <image> positions. `check=False` skips
        counting the slots (a compiled step cannot read values; the trainer counts them before)."""
        h = self.embed_tokens(input_ids)
        if image_features is None:
            return h
        is_img = input_ids == self.config.image_token_index
        feats = image_features.reshape(-1, image_features.shape[-1]).astype(h.dtype)
        n_slots = int(is_img.sum().item()) if check else feats.shape[0]
        if n_slots != feats.shape[0]:
            raise ValueError(
                f"the prompt has {n_slots} <image> tokens but the images give {feats.shape[0]} features "
                f"({self.config.num_image_tokens} per image): expand each <image> with the processor"
            )
        idx = mx.maximum(mx.cumsum(is_img.reshape(-1).astype(mx.int32)) - 1, 0)
        placed = feats[idx].reshape(h.shape)
        return mx.where(is_img[..., None], placed, h)

    def run_layers(
        self, h: mx.array, cache: list | None = None, keep: tuple[int, ...] = (), checkpoint: bool = False
    ) -> tuple[mx.array, dict[int, mx.array]]:
        """The decoder stack. Returns the final normed state and HF-indexed `hidden_states[k]` for k in keep."""
        lm = self.language_model.model
        n = len(lm.layers)
        keep_set = {k % (n + 1) for k in keep}
        cache = cache if cache is not None else [None] * n
        mask = create_attention_mask(h, cache[0])  # "causal" (or None for one token): never bidirectional
        kept = {0: h} if 0 in keep_set else {}
        cpu_prefill = device.is_cpu()  # only the CPU backend dequantizes whole matrices for a prefill
        for i, (layer, c) in enumerate(zip(lm.layers, cache, strict=True), start=1):
            if checkpoint:
                h = nn.utils.checkpoint(layer, lambda x, layer=layer: layer(x, mask, None))(h)
            else:
                h = layer(h, mask, c)
                if c is not None and h.shape[1] > DEQUANT_ROWS and cpu_prefill:
                    mx.eval(h)  # prefill layer by layer: dequantized weights never pile up in one graph
            if i in keep_set and i != n:
                kept[i] = h
        h = lm.norm(h)
        if n in keep_set:
            kept[n] = h
        return h, {k: kept[k % (n + 1)] for k in keep}

    def head_dequantized(self, rows: int) -> mx.array | None:
        """The float LM-head matrix, where a quantized head over `rows` rows is best done as one GEMM.

        Only on the CPU backend (where a many-row quantized matmul is ~40x slower than dequantize + BLAS)
        and only above DEQUANT_ROWS rows; Metal and CUDA keep the fused quantized matmul (None). Callers
        that run the head in chunks (ce_at) ask once and reuse it, so the 151,936 x 896 matrix is built
        once per loss, not once per chunk.
        """
        lm = self.language_model
        head = self.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head
        if not isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)) or rows <= DEQUANT_ROWS:
            return None
        return quantize.dequantized(head) if device.is_cpu() else None

    def lm_head(self, h: mx.array, dequantized: mx.array | None = None) -> mx.array:
        """Logits. `dequantized`: a matrix from head_dequantized() to reuse instead of building it again."""
        lm = self.language_model
        w = dequantized if dequantized is not None else self.head_dequantized(h.size // h.shape[-1])
        if w is not None:
            return h @ w.astype(h.dtype).T
        return self.embed_tokens.as_linear(h) if lm.args.tie_word_embeddings else lm.lm_head(h)

    def __call__(
        self, input_ids: mx.array, pixel_values: mx.array | None = None, cache: list | None = None
    ) -> mx.array:
        feats = self.image_features(pixel_values) if pixel_values is not None else None
        h, _ = self.run_layers(self.embed(input_ids, feats), cache)
        return self.lm_head(h)
