"""`python -m convert` in a checkout = `bonsai convert`. Not installed: a top-level `convert` in site-packages
would shadow users' own modules of that name, so the code lives in `bonsai_mlx.convert`."""

import sys

from bonsai_mlx.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
