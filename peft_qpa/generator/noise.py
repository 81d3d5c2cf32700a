"""Names and JSON forms of ``noise_model`` values, shared by the config (validation, saving) and the Aer backend.

A leaf: it imports nothing of peft_qpa, and Qiskit Aer and ``qiskit_ibm_runtime`` only inside functions, so a
config can be checked and saved without loading the simulator.

``qiskit_ibm_runtime`` (the offline fake IBM devices) is an optional dependency, the ``ibm`` extra: asking for a
device without it raises an ``ImportError`` that says ``pip install "peft-qpa[ibm]"`` (:func:`fake_provider`).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from typing import Any

# Key under which a NoiseModel's dict form is stored in JSON (see noise_model_to_json).
NOISE_MODEL_JSON_KEY = "qiskit_aer_noise_model"


def _snake_name(class_name: str) -> str:
    """``FakeKyiv`` -> ``fake_kyiv``; ``FakeAthensV2`` -> ``fake_athens``; ``FakeFractionalBackend`` ->
    ``fake_fractional`` (the same names as the backends' own ``.name``)."""
    stem = re.sub(r"(V2|Backend)$", "", class_name[len("Fake"):])
    return "fake_" + re.sub(r"(?<!^)(?=[A-Z])", "_", stem).lower()


IBM_EXTRA_HINT = 'pip install "peft-qpa[ibm]"'


def require_ibm_runtime(what: str = "The offline fake IBM devices"):
    """The ``qiskit_ibm_runtime`` module, or an ``ImportError`` saying that ``what`` needs the ``ibm`` extra."""
    try:
        import qiskit_ibm_runtime
    except ImportError as error:
        raise ImportError(
            f"{what} need qiskit-ibm-runtime, an optional dependency of peft-qpa that is not installed. Install it "
            f"with: {IBM_EXTRA_HINT} (or pip install qiskit-ibm-runtime)."
        ) from error
    return qiskit_ibm_runtime


def fake_provider():
    """``qiskit_ibm_runtime.fake_provider`` (the offline fake IBM devices), or an ``ImportError`` naming the extra."""
    require_ibm_runtime("The offline fake IBM devices (a device name as noise_model, available_fake_backends())")
    from qiskit_ibm_runtime import fake_provider as provider

    return provider


@functools.lru_cache(maxsize=None)
def available_fake_backends() -> dict[str, str]:
    """Offline fake IBM devices: snake-case name (``"fake_kyiv"``) -> class name in
    ``qiskit_ibm_runtime.fake_provider``. Only names are read here; nothing is instantiated. Needs the ``ibm``
    extra (``pip install "peft-qpa[ibm]"``): without it, an ``ImportError`` says so."""
    provider = fake_provider()

    names = {}
    for attr in dir(provider):
        if not attr.startswith("Fake") or attr.startswith("FakeProvider"):
            continue
        obj = getattr(provider, attr)
        if isinstance(obj, type):
            names[_snake_name(attr)] = attr
    return dict(sorted(names.items()))


def resolve_fake_backend_name(name: str) -> str:
    """The canonical name (``"fake_kyiv"``) of a ``noise_model`` device name, case and surrounding spaces
    ignored. Only names are read (no device or noise model is built); an unknown name raises a
    ``ValueError`` listing the valid ones."""
    available = available_fake_backends()
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in available:
        raise ValueError(
            f"QPAConfig.noise_model: unknown device {name!r}. Use one of the offline fake IBM devices "
            f"(peft_qpa.available_fake_backends() lists them): {', '.join(available)}; or pass a "
            "qiskit_aer.noise.NoiseModel, or None for no noise."
        )
    return key


@functools.lru_cache(maxsize=8)
def load_fake_backend(name: str):
    """Instantiate (once per process) the fake device called ``name`` (e.g. ``"fake_kyiv"``; case and surrounding
    spaces ignored). Needs the ``ibm`` extra."""
    return getattr(fake_provider(), available_fake_backends()[resolve_fake_backend_name(name)])()


def is_noise_model(value: Any) -> bool:
    """Whether ``value`` is a ``qiskit_aer.noise.NoiseModel`` (Aer is imported only when a non-name is asked)."""
    if value is None or isinstance(value, (str, dict)):
        return False
    from qiskit_aer.noise import NoiseModel

    return isinstance(value, NoiseModel)


def noise_model_from_dict(data: dict):
    """``NoiseModel.from_dict`` (deprecated in Aer 0.15 but still the only public inverse of
    ``to_dict``); None if a future Aer has removed it."""
    from qiskit_aer.noise import NoiseModel

    if not hasattr(NoiseModel, "from_dict"):
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="from_dict has been deprecated", category=DeprecationWarning)
        return NoiseModel.from_dict(data)


def noise_model_to_json(value):
    """JSON-safe form of a ``noise_model`` config value: a device name stays a string, a NoiseModel
    becomes ``{"qiskit_aer_noise_model": NoiseModel.to_dict(serializable=True)}`` (never a pickle)."""
    if value is None or isinstance(value, str):
        return value
    if is_noise_model(value):
        data = value.to_dict(serializable=True)
        json.dumps(data)  # fail here, not at save time, if something is not serialisable
        return {NOISE_MODEL_JSON_KEY: data}
    raise ValueError(
        f"noise_model must be a fake device name (str), a qiskit_aer.noise.NoiseModel or None, "
        f"got {type(value).__name__}."
    )


def noise_model_from_json(value):
    """Inverse of :func:`noise_model_to_json`."""
    if value is None or isinstance(value, str) or is_noise_model(value):
        return value
    if isinstance(value, dict) and NOISE_MODEL_JSON_KEY in value:
        model = noise_model_from_dict(value[NOISE_MODEL_JSON_KEY])
        if model is None:
            raise ValueError(
                "This qiskit-aer has no NoiseModel.from_dict, so a NoiseModel stored inline in JSON cannot "
                "be rebuilt; store a fake device name (e.g. 'fake_kyiv') as noise_model instead."
            )
        return model
    raise ValueError(
        f"Cannot read a noise_model from {value!r}: expected a device name, None, or a dict with key "
        f"{NOISE_MODEL_JSON_KEY!r} written by noise_model_to_json."
    )
