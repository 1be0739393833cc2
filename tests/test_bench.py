import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss inheritance across exec is Linux's")
def test_worker_peak_memory_is_its_own_not_its_parents():
    held = np.ones(1_000_000_000 // 8)  # ~1 GB resident in this (parent) process
    code = "from bonsai_mlx.bench import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert held.sum() > 0 and 0.0 < float(out.strip().splitlines()[-1]) < 0.6
