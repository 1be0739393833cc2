"""The import layers: shared core < MLX side | CUDA side < CLIs and the app < experiments. Parsed from the code.

`bonsai_mlx.app` and `bonsai_mlx.convert` sit inside the package (so they install under its name) but belong to
the CLI layer; the top-level `app/` and `convert/` are checkout shims onto them; `experiments/` (not installed)
may import anything, and nothing imports it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bonsai_mlx", "train_cuda", "app", "convert", "experiments")
CLI_IN_PACKAGE = ("bonsai_mlx.app", "bonsai_mlx.convert")  # the CLI/app layer, installed inside bonsai_mlx
SHIMS = {"app": "bonsai_mlx.app", "convert": "bonsai_mlx.convert"}  # checkout folder -> what it forwards to
HEAVY = ("mlx", "mlx_lm", "torch", "peft", "accelerate", "bitsandbytes", "gradio")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module `name` imports, at any depth of the file (lazy imports are arrows too)."""
    path = MODULES[name]
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return out


def _project(imports: set[str]) -> set[str]:
    return {i for i in imports if i in MODULES}


def _top(i: str) -> str:
    return i.split(".")[0]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _library(name: str) -> bool:
    """The installed library below the CLI layer: bonsai_mlx (but its app and convert) and train_cuda."""
    return _top(name) in ("bonsai_mlx", "train_cuda") and not _under(name, CLI_IN_PACKAGE)


def test_the_module_list_is_what_the_tree_holds():
    assert "bonsai_mlx.core.records" in MODULES and "train_cuda.trainer" in MODULES
    assert {"bonsai_mlx.convert.__main__", "bonsai_mlx.app.ui", "convert.__main__", "app.__main__"} <= set(MODULES)
    assert {"experiments.steps", "experiments.recipe", "experiments.shapes_kd"} <= set(MODULES)


def test_no_module_of_the_library_is_an_experiment():
    assert not [m for m in MODULES if _top(m) in ("bonsai_mlx", "train_cuda") and "experiments" in m.split(".")]


def test_the_shared_core_imports_no_tensor_library_and_nothing_above_it():
    for name in (m for m in MODULES if m.startswith("bonsai_mlx.core")):
        imps = _imports(name)
        heavy = sorted(i for i in imps if _top(i) in HEAVY)
        assert not heavy, f"{name} imports {heavy}"
        above = sorted(i for i in _project(imps) if not (i.startswith("bonsai_mlx.core") or i == "bonsai_mlx"))
        assert not above, f"{name} (shared core) imports {above}"


def test_the_library_imports_no_cli_package():
    for name in (m for m in MODULES if m.startswith("bonsai_mlx") and _library(m)):
        imps = _imports(name)
        up = sorted(i for i in imps if _top(i) in ("convert", "app", "train_cuda", "experiments"))
        up += sorted(i for i in imps if _under(i, CLI_IN_PACKAGE))
        assert not up, f"{name} imports {up}"


def test_the_cli_layer_in_the_package_imports_no_checkout_folder():
    for name in (m for m in MODULES if _under(m, CLI_IN_PACKAGE)):
        up = sorted(i for i in _imports(name) if _top(i) in ("convert", "app", "experiments"))
        assert not up, f"{name} imports {up}: it is installed, those folders are not"


def test_the_checkout_shims_only_forward_to_the_package():
    for name in (m for m in MODULES if _top(m) in SHIMS):
        other = sorted(i for i in _project(_imports(name)) if not _under(i, (SHIMS[_top(name)],)))
        assert not other, f"{name} imports {other}: the code belongs in {SHIMS[_top(name)]}"


def test_nothing_but_the_experiments_imports_them():
    for name in (m for m in MODULES if _top(m) != "experiments"):
        up = sorted(i for i in _imports(name) if _top(i) == "experiments")
        assert not up, f"{name} imports {up}"


def test_the_wheel_holds_the_library_and_no_generic_top_level_name():
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    installed = set(find_packages(str(ROOT), include=include["include"]))
    assert {"bonsai_mlx", "bonsai_mlx.app", "bonsai_mlx.convert", "train_cuda"} <= installed
    assert not {_top(p) for p in installed} & {"app", "convert", "experiments", "tests", "scripts"}, installed


def test_the_cuda_side_stands_on_the_shared_core_only():
    for name in (m for m in MODULES if m.startswith("train_cuda")):
        imps = _imports(name)
        mlx = sorted(i for i in imps if _top(i) in ("mlx", "mlx_lm"))
        assert not mlx, f"{name} imports {mlx}"
        mlx_side = sorted(i for i in _project(imps) if _top(i) == "bonsai_mlx" and not i.startswith("bonsai_mlx.core"))
        assert not mlx_side, f"{name} imports the MLX side: {mlx_side}"
        up = sorted(i for i in imps if _top(i) in ("convert", "app", "experiments"))
        assert not up, f"{name} imports {up}"


def test_no_import_cycles():
    graph = {m: _project(_imports(m)) - {m} for m in MODULES}
    # a package's __init__ is imported with each of its modules: not an arrow back to them
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


_NO_MLX = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm"):
            raise ImportError(f"{name} is not installed (test)")
sys.meta_path.insert(0, Block())
for m in sys.argv[1:]:
    importlib.import_module(m)
from bonsai_mlx import _blas
assert _blas.loaded_path is None, "OpenBLAS was preloaded in a process that never imported MLX"
assert not [m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm")]
print("ok", len(sys.argv) - 1)
"""


def test_every_cuda_side_module_imports_without_mlx():
    mods = sorted(m for m in MODULES if m.startswith(("train_cuda", "bonsai_mlx.core")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _NO_MLX, *mods], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"ok {len(mods)}"


def test_openblas_is_preloaded_at_the_first_mlx_import_when_present():
    code = (
        "import bonsai_mlx\nfrom bonsai_mlx import _blas\nassert _blas.loaded_path is None\n"
        "import mlx.core\nprint(_blas.loaded_path)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BONSAI_NO_OPENBLAS", "BONSAI_OPENBLAS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    from bonsai_mlx._blas import _CANDIDATES

    present = sys.platform == "linux" and any(Path(c.format(arch=os.uname().machine)).exists() for c in _CANDIDATES)
    assert (r.stdout.strip() != "None") == present, r.stdout


def test_openblas_threads_follow_the_free_cores_unless_the_user_chose(monkeypatch, tmp_path):
    """OpenBLAS's threads wait for each other in every matmul: on busy cores it gets one thread per free core (at
    least one); an OPENBLAS_NUM_THREADS the user set is kept."""
    from bonsai_mlx import _blas

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert [_blas.blas_threads(load=x) for x in (0.3, 1.2, 5.0)] == [2, 1, 1]
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert _blas.blas_threads(load=5.0) is None
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    # a container's CPU quota caps the cores (cgroup v2 cpu.max, v1 cfs quota / period)
    cg = Path(tmp_path)
    monkeypatch.setattr(_blas, "CGROUP", str(cg))
    assert _blas.quota_cores() is None and _blas.cores() == 2
    (cg / "cpu").mkdir()
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (cg / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _blas.quota_cores() is None
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert _blas.quota_cores() == 1 and _blas.blas_threads(load=0.0) == 1
    (cg / "cpu.max").write_text("max 100000\n")
    assert _blas.quota_cores() is None and _blas.blas_threads(load=0.0) == 2
    (cg / "cpu.max").write_text("150000 100000\n")
    assert _blas.quota_cores() == 2 and _blas.cores() == 2
    monkeypatch.setattr(_blas, "CGROUP", "/sys/fs/cgroup")
    if not (
        sys.platform == "linux" and any(Path(c.format(arch=os.uname().machine)).exists() for c in _blas._CANDIDATES)
    ):
        return
    code = (
        "import ctypes\nfrom bonsai_mlx import _blas\n_blas.busy_now = lambda: {}\nimport mlx.core\n"
        "print(ctypes.CDLL(_blas.loaded_path).openblas_get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BONSAI_NO_OPENBLAS", "OMP_NUM_THREADS")}
    cores = _blas.cores()
    for user, load, want in (("1", 0.0, 1), ("", 0.0, cores), ("", 9.0, 1)):
        env["OPENBLAS_NUM_THREADS"] = user
        r = subprocess.run([sys.executable, "-c", code.format(load)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        # (OpenBLAS caps its threads at the number it was built for: on a big machine, at least 2 is enough)
        assert int(r.stdout) == want or (want == cores > 2 and int(r.stdout) >= 2), (user, load)
