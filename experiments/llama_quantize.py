"""llama.cpp's quantizer through llama-cpp-python, with llama-quantize's arguments: IN.gguf OUT.gguf TYPE.

For `bonsai convert to-gguf --type q4_k_m --quantizer ...` where llama-cpp-python lives in another
environment: wrap it as `#!/bin/sh\nexec /path/to/that/python experiments/llama_quantize.py "$@"`.
"""

from __future__ import annotations

import sys

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[2].upper() not in FTYPES:
        print(f"usage: llama_quantize.py IN.gguf OUT.gguf {{{'|'.join(FTYPES)}}}", file=sys.stderr)
        return 2
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[args[2].upper()]
    return int(llama_cpp.llama_model_quantize(args[0].encode(), args[1].encode(), params))


if __name__ == "__main__":
    sys.exit(main())
