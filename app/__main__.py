"""`python -m app` in a checkout = `bonsai app`. Not installed: a top-level `app` in site-packages would shadow
users' own modules of that name, so the code lives in `bonsai_mlx.app`."""

import sys

from bonsai_mlx.app.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
