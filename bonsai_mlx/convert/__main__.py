"""bonsai convert (python -m bonsai_mlx.convert): to-mlx | to-hf | init [--tiny] | fuse | to-gguf"""

from __future__ import annotations

import argparse
import sys

from bonsai_mlx.core.errors import UserError, friendly
from bonsai_mlx.tiny import TinyRecipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bonsai convert", description="Move Pico weights between PyTorch/Hugging Face and MLX."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("to-mlx", help="HF/PyTorch Llava checkpoint -> MLX directory (float, 8-bit or 4-bit)")
    p.add_argument("src", help="model directory or hub id")
    p.add_argument("out")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the LM's linears and embedding")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--quantize-vision", action="store_true", help="also quantize the SigLIP linears")

    p = sub.add_parser("to-hf", help="MLX directory (even quantized) -> float HF Llava checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: as stored")

    p = sub.add_parser(
        "init",
        help="assemble a fresh Pico from a SigLIP and a Qwen2 checkpoint, or (--tiny) a from-scratch one for a dataset",
    )
    p.add_argument("--vision", help="SigLIP directory or hub id, e.g. google/siglip-base-patch16-224")
    p.add_argument("--text", help="Qwen2 directory or hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0, help="projector (--tiny: all weights) initialisation seed")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: as stored")
    t = p.add_argument_group("--tiny: random weights, tokenizer trained on --data (defaults: the embedded default's)")
    r = TinyRecipe()
    t.add_argument("--tiny", action="store_true", help="build a from-scratch tiny Pico instead of assembling one")
    t.add_argument("--data", help="LLaVA JSON/JSONL whose questions and answers train the tokenizer")
    t.add_argument("--image-root", help="where --data's images are (checked to be there)")
    t.add_argument("--image-size", type=int, default=r.image_size, help="square input size images are resized to")
    t.add_argument("--patch-size", type=int, default=r.patch_size)
    t.add_argument("--width", type=int, default=r.width, help="hidden size of the vision tower and the LM")
    t.add_argument("--layers", type=int, default=r.layers, help="LM decoder layers")
    t.add_argument("--vision-layers", type=int, default=r.vision_layers)
    t.add_argument("--heads", type=int, default=r.heads)
    t.add_argument("--kv-heads", type=int, default=r.kv_heads)
    t.add_argument("--vocab-size", type=int, default=r.vocab_size)
    t.add_argument("--max-positions", type=int, default=r.max_positions, help="image tokens + text tokens")
    t.add_argument("--init-std", type=float, default=r.init_std, help="N(0, std) init of the weight matrices")

    p = sub.add_parser("fuse", help="merge a trained adapter (+ projector) into its base: a full checkpoint")
    p.add_argument("base")
    p.add_argument("adapter", help="training output or checkpoint directory")
    p.add_argument("out")
    p.add_argument("--quantize", type=int, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the base's dtype")

    p = sub.add_parser("to-gguf", help="Pico -> llama.cpp: the language-model GGUF + the mmproj GGUF (vision)")
    p.add_argument("src", help="Pico directory (float or MLX-quantized) or hub id")
    p.add_argument("out_dir")
    p.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"],
        help="LM weight type (the mmproj is f16, f32 with f32); q4_k_m uses llama.cpp's own quantizer",
    )
    p.add_argument("--quantizer", help="a llama-quantize binary for q4_k_m (default: llama-cpp-python, or PATH)")

    a = ap.parse_args(argv)
    with friendly("convert"):
        if a.cmd == "to-mlx":
            from bonsai_mlx.conversion.hf_mlx import to_mlx

            note = to_mlx(a.src, a.out, a.dtype, a.quantize, a.group_size, a.quantize_vision)
        elif a.cmd == "to-hf":
            from bonsai_mlx.conversion.hf_mlx import to_hf

            note = to_hf(a.src, a.out, a.dtype)
        elif a.cmd == "init" and a.tiny:
            from bonsai_mlx.conversion.tiny_init import init_tiny

            if a.vision or a.text or a.dtype:
                raise UserError("init --tiny builds from scratch: drop --vision/--text/--dtype")
            if not a.data:
                raise UserError("init --tiny needs --data D.json (its text trains the tokenizer)")
            names = ("image_size", "patch_size", "width", "layers", "vision_layers", "heads", "kv_heads")
            names += ("vocab_size", "max_positions", "init_std")
            note = init_tiny(a.data, a.out, TinyRecipe(**{k: getattr(a, k) for k in names}), a.seed, a.image_root)
        elif a.cmd == "init":
            from bonsai_mlx.conversion.assemble import assemble

            if not (a.vision and a.text):
                raise UserError("init needs --vision SIGLIP and --text QWEN (or --tiny --data D.json)")
            note = assemble(a.vision, a.text, a.out, a.seed, a.dtype)
        elif a.cmd == "to-gguf":
            from bonsai_mlx.conversion.gguf import to_gguf

            note = to_gguf(a.src, a.out_dir, a.type, a.quantizer)
            a.out = a.out_dir
        else:
            from bonsai_mlx.conversion.fuse import fuse

            note = fuse(a.base, a.adapter, a.out, a.quantize, a.group_size, a.dtype)
        print(f"wrote {a.out} ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
