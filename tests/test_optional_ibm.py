"""qiskit-ibm-runtime is optional (the ``ibm`` extra): the core works without it, and what needs it says how to get it."""

import configparser
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peft_qpa
from peft_qpa.generator import GeneratorConfig, noise

ROOT = Path(__file__).resolve().parents[1]
HINT = 'pip install "peft-qpa[ibm]"'


@pytest.fixture
def without_ibm_runtime(monkeypatch):
    """As if qiskit-ibm-runtime were not installed: its imports fail, and nothing cached from it is reused."""
    for name in [m for m in sys.modules if m == "qiskit_ibm_runtime" or m.startswith("qiskit_ibm_runtime.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of a None entry raises ImportError
    monkeypatch.setitem(sys.modules, "qiskit_ibm_runtime", None)
    noise.available_fake_backends.cache_clear()
    noise.load_fake_backend.cache_clear()
    yield
    noise.available_fake_backends.cache_clear()
    noise.load_fake_backend.cache_clear()


def test_fake_devices_without_the_extra_say_how_to_install_it(without_ibm_runtime):
    with pytest.raises(ImportError, match=r'pip install "peft-qpa\[ibm\]"'):
        peft_qpa.available_fake_backends()
    with pytest.raises(ImportError, match=r'pip install "peft-qpa\[ibm\]"'):
        GeneratorConfig(backend="aer_shots", shots=100, noise_model="fake_kyiv")
    with pytest.raises(ImportError, match=r'pip install "peft-qpa\[ibm\]"'):
        peft_qpa.QPAConfig(target_modules=["q_proj"], backend="aer_shots", shots=100, noise_model="fake_kyiv")
    with pytest.raises(ImportError, match=r'pip install "peft-qpa\[ibm\]"'):
        noise.load_fake_backend("fake_kyiv")
    # what does not name a fake device works as before
    GeneratorConfig(backend="aer_shots", shots=100)
    from qiskit_aer.noise import NoiseModel, depolarizing_error

    model = NoiseModel()
    model.add_all_qubit_quantum_error(depolarizing_error(0.01, 1), ["ry"])
    GeneratorConfig(backend="aer_shots", shots=100, noise_model=model)


def test_import_peft_qpa_does_not_need_qiskit_ibm_runtime():
    """A fresh interpreter in which qiskit_ibm_runtime cannot be imported: peft_qpa imports and a generator runs."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "qiskit_ibm_runtime":
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Block())
        import peft_qpa
        from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec

        generator = QPAGenerator.from_config(GeneratorConfig(qnn_depth=1, chunk_size=4, mapping_hidden_sizes=[4]),
                                             [TensorSpec("w", (8, 4))])
        assert generator.generate().shape == (32,)
        assert "qiskit_ibm_runtime" not in sys.modules
        try:
            peft_qpa.available_fake_backends()
        except ImportError as error:
            print("IMPORT_ERROR:", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT_ERROR:" in result.stdout and HINT in result.stdout


def test_setup_cfg_makes_it_an_extra_that_the_tests_install():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def names(text):
        lines = [line.split("#")[0].strip() for line in text.splitlines()]
        return {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in lines if line}

    assert "qiskit-ibm-runtime" not in names(cfg["options"]["install_requires"])
    extras = cfg["options.extras_require"]
    assert "qiskit-ibm-runtime" in names(extras["ibm"]) and "qiskit-ibm-runtime" in names(extras["test"])
