"""Make MLX's CPU backend use OpenBLAS on Linux.

The `mlx[cpu]` wheel links a reference BLAS (~5 GFLOP/s on a laptop core). Loading the system
OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is first imported makes MLX bind to it instead
(~30x faster GEMM). This must run before anything imports mlx.core, yet a process that never imports
MLX (the PyTorch side) must not get a second BLAS: `install_hook` defers the preload to the moment
`mlx.core` is first imported.

OpenBLAS's threads meet at a barrier inside every matmul, so when other processes hold the cores, one
descheduled thread stalls them all: the embedded default's step ran 6.8x slower with 2 threads than with 1 on a
2-core machine at load ~5, and 1.2x faster with 2 on the same machine quiet (docs/benchmarks.md). So, unless the
user set OPENBLAS_NUM_THREADS or OMP_NUM_THREADS, OpenBLAS gets one thread per core that is free when MLX is first
imported (at least one): the cores (its affinity, capped by a cgroup CPU quota) less those other processes keep
busy at that moment (the CPUs' busy share
over a tenth of a second, /proc/stat; the 1-minute load average would still count the install that ran before).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib.abc import MetaPathFinder

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded_path: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if we are on Linux and mlx.core is not imported yet."""
    global loaded_path
    if loaded_path is not None or sys.platform != "linux" or os.environ.get("BONSAI_NO_OPENBLAS"):
        return loaded_path
    if "mlx.core" in sys.modules:
        return None
    arch = platform.machine()
    paths = [os.environ["BONSAI_OPENBLAS"]] if os.environ.get("BONSAI_OPENBLAS") else []
    paths += [p.format(arch=arch) for p in _CANDIDATES]
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_path = path
            _set_threads(path)
            return path
    print(
        "bonsai_mlx: OpenBLAS not found, so MLX's CPU matmuls run ~30x slower. "
        "Install it with: sudo apt-get install libopenblas0-pthread",
        file=sys.stderr,
    )
    return None


def blas_threads(load: float | None = None) -> int | None:
    """OpenBLAS's thread count for MLX: None when the user chose one (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS),
    else the cores this process may run on less those other processes keep busy (busy_now), at least one."""
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    n = cores()
    if n == 1:
        return 1
    if load is None:
        load = busy_now()
    return max(1, n - int(load + 0.5))


def cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's --cpus)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = quota_cores()
    return max(1, min(n, quota)) if quota is not None else n


CGROUP = "/sys/fs/cgroup"


def quota_cores(root: str | None = None) -> int | None:
    """The cgroup CPU quota in cores, rounded up (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`,
    at the cgroup root a container sees), or None when there is none or it cannot be read."""
    import math

    root = CGROUP if root is None else root
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return math.ceil(q / p) if q > 0 and p > 0 else None


def _cpu_jiffies() -> tuple[int, int, int]:
    """(busy, total) jiffies since boot summed over the CPUs this process may run on, and their number
    (/proc/stat's cpuN lines; all CPUs where the affinity is unknown)."""
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        mine = None
    busy = total = n = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()) or (mine is not None and name not in mine):
                continue
            v = [int(x) for x in vals[:8]]  # guest and guest_nice are already inside user and nice
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            busy, total, n = busy + sum(v) - idle, total + sum(v), n + 1
    return busy, total, n


def busy_now(window_s: float = 0.1) -> float:
    """Cores that other processes keep busy now: the CPUs' busy share over `window_s` times their number, less
    what this process's own threads used meanwhile (an import may have started some); else the 1-minute load
    average; else 0."""
    import time

    try:
        b0, t0, n = _cpu_jiffies()
        own0, w0 = _own_cpu_s(), time.perf_counter()
        time.sleep(window_s)
        b1, t1, _ = _cpu_jiffies()
        own = (_own_cpu_s() - own0) / max(1e-6, time.perf_counter() - w0)
        if not n:
            raise ValueError("no cpuN lines")
        return max(0.0, n * (b1 - b0) / max(1, t1 - t0) - own)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


chosen: int | None = None  # the thread count set at the preload (None: the user's, or OpenBLAS's own)


def _set_threads(path: str) -> None:
    global chosen
    n = blas_threads()
    if n is not None and set_threads(n):
        chosen = n


def set_threads(n: int) -> bool:
    """Set the preloaded OpenBLAS's thread count (False when none is loaded or it is not OpenBLAS)."""
    if loaded_path is None:
        return False
    try:
        ctypes.CDLL(loaded_path).openblas_set_num_threads(n)
    except (OSError, AttributeError):  # another BLAS named like OpenBLAS: leave it as it is
        return False
    return True


def get_threads() -> int | None:
    try:
        return int(ctypes.CDLL(loaded_path).openblas_get_num_threads()) if loaded_path else None
    except (OSError, AttributeError):
        return None


class _PreloadBeforeMLX(MetaPathFinder):
    """Finds nothing itself; on the first look-up of `mlx.core` it loads OpenBLAS and steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mlx.core":
            uninstall_hook()
            preload_openblas()
        return None


_hook = _PreloadBeforeMLX()


def install_hook() -> None:
    """Arrange for `preload_openblas` to run just before `mlx.core` loads (now, if it already did: no-op)."""
    if "mlx.core" not in sys.modules and sys.platform == "linux" and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def uninstall_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
