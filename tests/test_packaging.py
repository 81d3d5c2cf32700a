"""The sdist and the wheel ship the fused kernel's source, and the kernel loads from an installed wheel.

Outside an editable install the package's own files are all the simulator has: without
``peft_qpa/generator/backends/csrc/ry_layers.cpp`` in the wheel it would silently fall back to its 5-12x slower torch path.
The project is built the way ``python -m build`` does it (the sdist from a clean copy of the checkout,
the wheel from the unpacked sdist), offline and without build isolation; the wheel is then installed
into a fresh virtual environment, which borrows this environment's packages (torch and the other
dependencies) but not its editable ``peft_qpa``, and the kernel is loaded there from a temporary folder.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "peft_qpa/generator/backends/csrc/ry_layers.cpp"
IGNORED = (".git", "__pycache__", "*.pyc", "*.so", "*.egg-info", "build", "dist", ".pytest_cache", ".cache",
           "outputs", "results")


def _run(command, cwd, timeout=300, env=None):
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel): the sdist built from a clean copy of the checkout, the wheel from the sdist."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*IGNORED))
    out = root / "dist"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                                "print(build_meta.build_sdist(sys.argv[1]))", str(out)], cwd=source)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        archive.extractall(root / "unpacked", **safe)
    (unpacked,) = (root / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          "--wheel-dir", str(out), str(unpacked)], cwd=root)
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_sdist_and_wheel_ship_the_kernel_source(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        assert any(name.endswith("/" + KERNEL) for name in names), names
    with zipfile.ZipFile(wheel) as archive:
        assert KERNEL in archive.namelist(), archive.namelist()
        assert archive.read(KERNEL) == (ROOT / KERNEL).read_bytes()


@pytest.mark.slow
def test_installed_wheel_loads_the_fused_kernel(dists, tmp_path):
    """The wheel, installed into a fresh environment, loads the kernel from its own copy of the source
    (``PEFT_QPA_FUSED_KERNEL=1``: a failed build is an error) and runs it. The build directory is keyed
    by the source's content, so the build this checkout already made is reused (no second compile)."""
    from peft_qpa.generator.backends import fused_kernel

    if fused_kernel.load() is None:
        pytest.skip(f"the fused CPU kernel cannot be built here either: {fused_kernel.error() or 'turned off'}")
    _, wheel = dists
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp_path)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # this environment's packages as plain path entries: their .pth files (the editable install's
    # import hook among them) are not run, so `peft_qpa` can only come from the installed wheel
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "borrowed_test_environment.pth").write_text("\n".join(borrowed) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=tmp_path)
    probe = (
        "import json, torch, peft_qpa\n"
        "from peft_qpa.generator.backends import fused_kernel\n"
        "from peft_qpa.generator.circuit import build_ansatz\n"
        "from peft_qpa.generator.backends.statevector import StatevectorSimulator\n"
        "module = fused_kernel.load()\n"
        "angles = torch.linspace(0, 3, build_ansatz(5, 2).num_parameters, dtype=torch.float64)\n"
        "fused = StatevectorSimulator(build_ansatz(5, 2), kernel='fused')(angles)\n"
        "reference = StatevectorSimulator(build_ansatz(5, 2), kernel='torch')(angles)\n"
        "print('PROBE ' + json.dumps({'package': peft_qpa.__file__, 'source': str(fused_kernel.SOURCE),\n"
        "    'module': module.__file__, 'directory': str(fused_kernel.build_directory()),\n"
        "    'max_diff': float((fused - reference).abs().max())}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env[fused_kernel.ENV_VAR] = "1"
    work = tmp_path / "elsewhere"  # not the checkout: nothing of it is importable from here
    work.mkdir()
    proc = _run([str(python), "-c", probe], cwd=work, env=env, timeout=600)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("PROBE "))
    found = json.loads(line[len("PROBE "):])
    assert Path(found["package"]).is_relative_to(site), found  # the wheel's peft_qpa, not the checkout's
    assert Path(found["source"]) == site / KERNEL and Path(found["source"]).is_file()
    assert Path(found["directory"]) == fused_kernel.build_directory()  # the checkout's build, shared
    assert Path(found["module"]).parent == Path(found["directory"])
    assert found["max_diff"] < 1e-12
