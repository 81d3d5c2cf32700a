"""Fetch PEFT's own test suite (from its source distribution) at test time, for ``test_peft_common.py``
(upstream ``test_custom_models.py``) and ``test_peft_decoder.py`` (upstream ``test_decoder_models.py``).

The wheel ships no tests, so the sdist of the *installed* peft version is downloaded with pip
(``pip download --no-deps --no-binary :all: peft==<version>``) into a cache directory, and its ``tests/``
folder is extracted there under the package name ``peft_upstream_tests`` (the upstream files use relative
imports). Nothing is copied into this repository.

Cache: ``$PEFT_QPA_CACHE`` if set, else ``~/.cache/peft_qpa/peft-sdist``. A cached sdist is reused.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

PACKAGE = "peft_upstream_tests"


class UpstreamUnavailable(RuntimeError):
    """The sdist could not be fetched or its tests could not be imported (e.g. offline)."""


def cache_dir() -> Path:
    root = os.environ.get("PEFT_QPA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "peft_qpa" / "peft-sdist"


def peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def fetch_sdist(version: str, timeout: float = 300) -> Path:
    """The path of ``peft-<version>.tar.gz`` in the cache, downloading it with pip if it is not there."""
    cache = cache_dir()
    target = cache / f"peft-{version}.tar.gz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}",
               "--dest", tmp, "--disable-pip-version-check", "--quiet"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpstreamUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from exc
        found = sorted(Path(tmp).glob(f"peft-{version}.tar.gz"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise UpstreamUnavailable(f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {' | '.join(tail)}")
        os.replace(found[0], target)  # atomic: a concurrent run sees either nothing or the whole file
    return target


def extract_tests(sdist: Path, version: str) -> Path:
    """Extract the sdist's ``tests/*.py`` as package ``peft_upstream_tests``; returns the dir to put on sys.path."""
    root = cache_dir() / f"peft-{version}-tests"
    package = root / PACKAGE
    marker = package / ".complete"
    if marker.is_file():
        return root
    prefix = f"peft-{version}/tests/"
    tmp_root = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="extract-"))
    try:
        tmp_pkg = tmp_root / PACKAGE
        tmp_pkg.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(prefix) and name.endswith(".py")):
                    continue
                rel = name[len(prefix):]
                if "/" in rel or rel.startswith("."):  # only the top-level test modules
                    continue
                with tar.extractfile(member) as src, open(tmp_pkg / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for needed in ("testing_common.py", "test_custom_models.py", "testing_utils.py"):
            if not (tmp_pkg / needed).is_file():
                raise UpstreamUnavailable(f"{sdist.name} has no tests/{needed}")
        (tmp_pkg / "__init__.py").touch()
        (tmp_pkg / ".complete").touch()
        if package.exists():
            shutil.rmtree(package)
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_pkg, package)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return root


def _stub_missing_optional_imports() -> None:
    """Upstream's test helpers import ``diffusers`` and ``datasets`` at module level, only for Stable Diffusion
    and dataset-loading tests that are not run here. Provide inert stand-ins when they are not installed."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # only used in isinstance checks by the common tester
            pass

        stub.StableDiffusionPipeline = StableDiffusionPipeline
        stub.__peft_qpa_stub__ = True
        sys.modules["diffusers"] = stub
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("`datasets` is not installed (stub from tests/peft_upstream.py)")

        stub.load_dataset = load_dataset
        stub.__peft_qpa_stub__ = True
        sys.modules["datasets"] = stub


def load_upstream_module(name: str, preload: tuple[str, ...] = ()):
    """Import and return upstream ``tests/<name>.py`` (e.g. ``"test_decoder_models"``) for the installed peft version.

    ``preload``: modules to import *before* the ``diffusers``/``datasets`` stand-ins are installed, because they
    probe for those packages at import time (``importlib.util.find_spec`` fails on a stand-in without a spec).

    Raises :class:`UpstreamUnavailable` if it cannot be fetched or imported."""
    version = peft_version()
    sdist = fetch_sdist(version)
    try:
        root = extract_tests(sdist, version)
    except (tarfile.TarError, OSError) as exc:
        raise UpstreamUnavailable(f"cannot extract tests from {sdist}: {exc}") from exc
    if not (root / PACKAGE / f"{name}.py").is_file():
        raise UpstreamUnavailable(f"{sdist.name} has no tests/{name}.py")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        for module in preload:
            importlib.import_module(module)
    except ImportError as exc:
        raise UpstreamUnavailable(f"cannot import {module}, needed by upstream {name}: {exc}") from exc
    _stub_missing_optional_imports()
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as exc:
        raise UpstreamUnavailable(f"cannot import upstream {name} (peft {version}): {exc}") from exc
    finally:
        # The stand-ins must not outlive the import: transformers probes `datasets` with find_spec.
        for stub in ("diffusers", "datasets"):
            if getattr(sys.modules.get(stub), "__peft_qpa_stub__", False):
                del sys.modules[stub]


def load_custom_models_module():
    """Import and return upstream ``tests/test_custom_models.py`` for the installed peft version.

    Raises :class:`UpstreamUnavailable` if it cannot be fetched or imported."""
    return load_upstream_module("test_custom_models")


def load_decoder_models_module():
    """Import and return upstream ``tests/test_decoder_models.py`` for the installed peft version.

    Raises :class:`UpstreamUnavailable` if it cannot be fetched or imported."""
    # It imports `transformers.Trainer`, whose module checks `is_datasets_available()` on import.
    return load_upstream_module("test_decoder_models", preload=("transformers.trainer",))
