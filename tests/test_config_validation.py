"""QPAConfig validation: every field checked at construction, and memory that user values control capped
before anything is allocated (shots, chunk_size, hidden sizes). Configs only, plus a few tiny builds."""

import json
import math

import numpy as np
import pytest
import torch
from peft import get_peft_model

import peft_qpa
from peft_qpa.generator import memory as config_module
from peft_qpa.generator.backends.aer import AerProbabilities, available_fake_backends, resolve_shots
from peft_qpa.generator.backends import check_generator_memory
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa import QPAConfig
from peft_qpa.generator.config import SEED_MAX
from peft_qpa.generator.memory import AER_BYTES_PER_SHOT, MEMORY_BUDGET_ENV

from tiny_models import MODEL_FACTORIES, TARGETS

SMALL = dict(target_modules=["q_proj"], chunk_size=8, qnn_depth=2, mapping_hidden_sizes=[8])


def refused(field, match=None, **kwargs):
    """The ValueError QPAConfig(**kwargs) raises; it must name ``QPAConfig.<field>``."""
    with pytest.raises(ValueError, match=match or rf"QPAConfig\.{field}\b") as info:
        QPAConfig(**{**SMALL, **kwargs})
    return str(info.value)


@pytest.fixture
def budget_gb(monkeypatch):
    """Set the memory budget explicitly (deterministic, whatever the machine has free)."""

    def set_budget(gigabytes):
        monkeypatch.setenv(MEMORY_BUDGET_ENV, str(gigabytes))

    return set_budget


# ------------------------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize("field", ["lora_alpha", "prob_gamma", "prob_beta", "prob_eps", "prob_alpha", "lora_dropout"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(field, value):
    message = refused(field, **{field: value})
    assert "must be" in message and repr(value) in message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prob_gamma=1e303, simulator_dtype="float64"), "prob_gamma"),  # gamma * 2^23 overflows to inf
        (dict(prob_gamma=1e33), "prob_gamma"),  # finite in float64, but inf once cast to the float32 simulator
        (dict(prob_beta=1e39), "prob_beta"),
        (dict(prob_eps=1e-50), "prob_eps"),  # zero in float32: the slope at p = 0 would be infinite again
    ],
)
def test_postprocessing_constants_must_be_finite_in_the_simulator_dtype(kwargs, field):
    refused(field, **kwargs)


def test_prob_gamma_limit_is_what_keeps_the_postprocessing_finite():
    """A gamma just inside the limit gives finite post-processed probabilities, also for p = 0."""
    cfg = QPAConfig(**SMALL, prob_gamma=1e30)
    probs = torch.tensor([0.0, 1e-9, 0.5, 1.0])
    scaled = cfg.prob_beta * torch.tanh(cfg.prob_gamma * 2 ** (cfg.max_qubits - 1) * probs)
    assert torch.isfinite((scaled + cfg.prob_eps) ** cfg.prob_alpha).all()


# ------------------------------------------------------------------------------------ bools


@pytest.mark.parametrize("field", ["init_weights", "fan_in_fan_out", "generative_interpolation", "inference_mode"])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None])
def test_bool_fields_take_only_bools(field, value):
    message = refused(field, **{field: value})
    assert "True or False" in message


def test_bools_are_accepted():
    cfg = QPAConfig(**SMALL, init_weights=False, fan_in_fan_out=True, inference_mode=True)
    assert cfg.init_weights is False and cfg.fan_in_fan_out is True


# ------------------------------------------------------------------------------------ strings where numbers belong


@pytest.mark.parametrize(
    "field, value, extra",
    [
        ("r", "4", {}),
        ("lora_alpha", "8", {}),
        ("lora_dropout", "0.1", {}),
        ("prob_gamma", "0.1", {}),
        ("prob_beta", "0.6", {}),
        ("prob_alpha", "0.15", {}),
        ("prob_eps", "1e-6", {}),
        ("qnn_depth", "2", {}),
        ("chunk_size", "64", {}),
        ("max_qubits", "8", {}),
        ("seed", "0", {}),
        ("aer_max_parallel_threads", "1", {}),
        ("shots", "100", {"backend": "aer_shots"}),
        ("shots_per_state", "20", {"backend": "aer_shots"}),
        ("lora_alpha", True, {}),
        ("r", 4.0, {}),
        ("shots", 100.0, {"backend": "aer_shots"}),
    ],
)
def test_strings_and_other_types_where_numbers_belong(field, value, extra):
    refused(field, **{field: value}, **extra)


@pytest.mark.parametrize("field", ["mapping_hidden_sizes", "gi_hidden_sizes"])
@pytest.mark.parametrize("value", [None, 32, "32", [8, "8"], [8, 0], [8, True]])
def test_hidden_sizes_must_be_lists_of_positive_ints(field, value):
    refused(field, **{field: value})


def test_empty_hidden_sizes_are_a_linear_map_and_build():
    """[] is allowed (documented): the mapping is then one Linear layer from the N + 1 features."""
    cfg = QPAConfig(r=2, target_modules=TARGETS["llama"], chunk_size=8, qnn_depth=1, mapping_hidden_sizes=[])
    model = get_peft_model(MODEL_FACTORIES["llama"](), cfg)
    generator = model.base_model.get_generator()
    linears = [m for m in generator.mapping if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == generator.n_qubits + 1
    assert torch.isfinite(generator.generate()).all()


def test_numpy_numbers_and_tuples_are_normalised_and_json_safe():
    cfg = QPAConfig(
        target_modules=["q_proj"], r=np.int64(3), lora_alpha=np.float32(6.0), seed=np.uint64(7),
        mapping_hidden_sizes=(np.int64(8), 4), layers_to_transform=(np.int32(0), 1), modules_to_save=("lm_head",),
    )
    assert type(cfg.r) is int and type(cfg.seed) is int and type(cfg.lora_alpha) is float
    assert cfg.mapping_hidden_sizes == [8, 4] and all(type(h) is int for h in cfg.mapping_hidden_sizes)
    assert cfg.layers_to_transform == [0, 1] and cfg.modules_to_save == ["lm_head"]
    json.dumps(cfg.to_dict(), default=lambda s: sorted(s) if isinstance(s, set) else repr(s))


# ------------------------------------------------------------------------------------ seed


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**64 - 1, 2**70, True, 1.0])
def test_seed_outside_what_every_rng_accepts_is_refused(seed):
    message = refused("seed", seed=seed)
    assert "2**63 - 1" in message


def test_seed_range_is_accepted_by_every_consumer():
    """The largest seed QPAConfig accepts works in every RNG it reaches: torch.Generator and torch.manual_seed
    (generator, GI), Qiskit's seed_transpiler and Aer's seed_simulator (AerProbabilities), SeedSequence."""
    assert QPAConfig(**SMALL, seed=SEED_MAX).seed == SEED_MAX
    torch.Generator().manual_seed(SEED_MAX)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_MAX)
    from qiskit_aer.noise import NoiseModel, depolarizing_error

    noise = NoiseModel(basis_gates=["ry", "cx"])
    noise.add_all_qubit_quantum_error(depolarizing_error(0.01, 1), ["ry"])
    qc = build_ansatz(2, 1)
    module = AerProbabilities(qc, backend="aer_shots", shots=50, shot_gradient="exact", noise_model=noise, seed=SEED_MAX)
    probs, counts = module(torch.zeros(qc.num_parameters), 3)
    assert int(counts.sum()) == 50
    # ... and Aer's seed_simulator itself stops at int64, which is why the range ends at 2**63 - 1
    from qiskit_aer import AerSimulator

    measured = build_ansatz(1, 1).assign_parameters([0.0])
    measured.measure_all()
    AerSimulator().run(measured, shots=1, seed_simulator=SEED_MAX).result()
    with pytest.raises(Exception):
        AerSimulator().run(measured, shots=1, seed_simulator=SEED_MAX + 1).result()


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1])
def test_aer_module_refuses_the_same_seeds(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        AerProbabilities(build_ansatz(2, 1), backend="aer_statevector", shots=None, shot_gradient="exact",
                         noise_model=None, seed=seed)


# ------------------------------------------------------------------------------------ noise_model


def test_unknown_noise_model_name_is_refused_at_config_time_with_the_valid_names():
    message = refused("noise_model", backend="aer_shots", shots=100, noise_model="fake_nowhere")
    assert "fake_nowhere" in message and "fake_kyiv" in message and "available_fake_backends()" in message


def test_noise_model_name_is_checked_without_building_the_device(monkeypatch):
    import peft_qpa.generator.backends.aer as aer

    def do_not_build(name):
        raise AssertionError("the config check must not instantiate the fake device")

    import peft_qpa.generator.noise as noise

    monkeypatch.setattr(aer, "load_fake_backend", do_not_build)
    monkeypatch.setattr(noise, "load_fake_backend", do_not_build)  # where it lives; aer.py re-exports it
    cfg = QPAConfig(**SMALL, backend="aer_shots", shots=100, noise_model=" Fake_Kyiv ")
    assert cfg.noise_model == " Fake_Kyiv "  # kept as given; case and spaces are ignored when it is used
    assert "fake_kyiv" in available_fake_backends()


@pytest.mark.parametrize("value", [42, ["fake_kyiv"], 3.5])
def test_noise_model_of_another_type_is_refused(value):
    refused("noise_model", backend="aer_shots", shots=100, noise_model=value)


# ------------------------------------------------------------------------------------ LoRA's fields


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_modules=[1, 2]), "target_modules"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=42), "target_modules"),
        (dict(target_modules="q_proj("), "target_modules"),  # a string is a regex: must compile
        (dict(exclude_modules=[1]), "exclude_modules"),
        (dict(exclude_modules="[unclosed"), "exclude_modules"),
        (dict(modules_to_save="lm_head"), "modules_to_save"),  # a bare string would be iterated per character
        (dict(modules_to_save=[1]), "modules_to_save"),
        (dict(layers_to_transform="1"), "layers_to_transform"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
        (dict(layers_to_transform=[0, True]), "layers_to_transform"),
        (dict(layers_to_transform=1.5), "layers_to_transform"),
        (dict(layers_to_transform=[0], layers_pattern=3), "layers_pattern"),
        (dict(bias=None), "bias"),
        (dict(bias=["none"]), "bias"),
        (dict(ansatz=["ry_cnot"]), "ansatz"),
        (dict(backend=None), "backend"),
    ],
)
def test_lora_field_types(kwargs, field):
    refused(field, **kwargs)


def test_regex_target_modules_cannot_be_combined_with_layers_to_transform():
    with pytest.raises(ValueError, match="layers_to_transform/layers_pattern cannot be used when target_modules"):
        QPAConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_valid_lora_field_forms_are_accepted():
    QPAConfig(target_modules="all-linear")
    QPAConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.0\..*")
    QPAConfig(target_modules=["q_proj"], exclude_modules=[], layers_to_transform=1, layers_pattern="layers")
    QPAConfig(target_modules=["q_proj"], layers_to_transform=[], modules_to_save=["lm_head"], bias="qpa_only")


# ------------------------------------------------------------------------------------ loading still works


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj"], layers_to_transform=[0, 1],
             layers_pattern="layers", modules_to_save=["lm_head"], seed=SEED_MAX),
        dict(target_modules=".*q_proj", backend="aer_shots", shots_per_state=20, noise_model="fake_kyiv",
             generative_interpolation=True, gi_hidden_sizes=[]),
        dict(target_modules=["q_proj"], backend="aer_statevector", noise_model="noise-object", mapping_hidden_sizes=[]),
    ],
)
def test_saved_configs_load_back(kwargs, tmp_path):
    if kwargs.get("noise_model") == "noise-object":
        from qiskit_aer.noise import NoiseModel, depolarizing_error

        noise = NoiseModel(basis_gates=["rz", "sx", "cx"])
        noise.add_all_qubit_quantum_error(depolarizing_error(0.02, 1), ["sx"])
        kwargs = dict(kwargs, noise_model=noise)
    cfg = QPAConfig(**kwargs)
    cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(stored["target_modules"], (list, str))  # sets are stored as lists
    loaded = QPAConfig.from_pretrained(tmp_path)

    def canonical(c):  # a NoiseModel comes back equivalent, not identical (Aer rewrites Pauli errors as unitaries)
        d = c.to_dict()
        if not isinstance(d["noise_model"], (str, type(None))):
            d["noise_model"] = type(c.noise_model).__name__
        return json.dumps(d, sort_keys=True, default=sorted)

    assert canonical(loaded) == canonical(cfg)


# ------------------------------------------------------------------------------------ memory caps


def test_available_memory_is_read():
    available = config_module.available_memory_bytes()
    assert available is not None and available > 0
    budget, how = config_module.memory_budget()
    assert budget == pytest.approx(available * config_module.MEMORY_BUDGET_FRACTION, rel=0.2)
    assert MEMORY_BUDGET_ENV in how


def test_huge_shots_are_refused_before_aer_allocates(budget_gb):
    budget_gb(16)
    message = refused("shots", backend="aer_shots", shots=2**31 - 1)
    assert "275 GB" in message and "16 GB" in message and "Lower shots" in message


def test_huge_shots_are_refused_with_the_machines_own_budget():
    message = refused("shots", backend="aer_shots", shots=2**50)  # 144 PB: no machine has that
    assert "available now" in message and MEMORY_BUDGET_ENV in message


@pytest.mark.parametrize("chunk_size", [10**9, 2**40])
def test_huge_chunk_size_is_refused_at_config_time(chunk_size):
    message = refused("chunk_size", chunk_size=chunk_size)
    assert "output layer" in message and "Lower chunk_size" in message


def test_huge_hidden_sizes_are_refused():
    refused("mapping_hidden_sizes", mapping_hidden_sizes=[10**6, 10**6])
    gi = dict(backend="aer_shots", shots=10, generative_interpolation=True)
    refused("gi_hidden_sizes", **gi, gi_hidden_sizes=[10**6, 10**6])


def test_the_cap_follows_the_budget(budget_gb):
    shots = 10**6
    budget_gb(shots * AER_BYTES_PER_SHOT * 2 / 1e9)
    QPAConfig(**SMALL, backend="aer_shots", shots=shots)
    budget_gb(shots * AER_BYTES_PER_SHOT / 2 / 1e9)
    refused("shots", backend="aer_shots", shots=shots)
    budget_gb("inf")
    QPAConfig(**SMALL, backend="aer_shots", shots=2**50)


@pytest.mark.parametrize("value", ["lots", "0", "-1", "nan"])
def test_bad_budget_variable_is_named(budget_gb, value):
    budget_gb(value)
    with pytest.raises(ValueError, match=MEMORY_BUDGET_ENV):
        QPAConfig(**SMALL)


def test_shots_per_state_is_checked_once_n_is_known(budget_gb):
    budget_gb(1e-4)  # 100 kB: the config (N >= 1: 40 shots) fits, 20 * 2^12 shots (10 MB) do not
    cfg = QPAConfig(**SMALL, backend="aer_shots", shots_per_state=20)
    assert resolve_shots(cfg.shots, cfg.shots_per_state, 2) == 80
    with pytest.raises(ValueError, match=r"shots_per_state at N = 12 qubits \(81920 shots\) needs about 10.5 MB"):
        resolve_shots(cfg.shots, cfg.shots_per_state, 12)
    with pytest.raises(ValueError, match=r"shots_per_state"):
        check_generator_memory(cfg, num_generated=8 * 2**12)
    with pytest.raises(ValueError, match=r"shots_per_state at N = 12"):
        resolve_shots(None, 20, 12)


def test_aer_module_refuses_too_many_shots_before_running(budget_gb, monkeypatch):
    budget_gb(1e-3)
    qc = build_ansatz(2, 1)
    with pytest.raises(ValueError, match=r"shots needs about 128 MB .* Lower shots: at most 7812 shots fit"):
        AerProbabilities(qc, backend="aer_shots", shots=10**6, shot_gradient="exact", noise_model=None, seed=0)


def test_get_peft_model_refuses_shots_per_state_before_running_aer(budget_gb, monkeypatch):
    import peft_qpa.generator.backends.aer as aer

    budget_gb(2e-4)
    ran = []
    monkeypatch.setattr(aer.AerProbabilities, "_evaluate", lambda *a: ran.append(1))
    cfg = QPAConfig(r=4, target_modules=TARGETS["llama"], chunk_size=8, qnn_depth=1, mapping_hidden_sizes=[8],
                    backend="aer_shots", shots_per_state=20)
    with pytest.raises(ValueError, match=r"shots_per_state at N = \d+ qubits"):
        get_peft_model(MODEL_FACTORIES["llama"](), cfg)
    assert not ran


def test_generator_check_uses_the_real_size(budget_gb):
    """M (set by r and the targets) and N are only known at the build: the build-time check sees them."""
    budget_gb(0.05)  # 50 MB
    cfg = QPAConfig(target_modules=["q_proj"], chunk_size=4096, mapping_hidden_sizes=[8])
    check_generator_memory(cfg, num_generated=4096)
    with pytest.raises(ValueError, match=r"QPAConfig\.r=4 needs about 403 MB for the M = 16777216 generated .*Lower r"):
        check_generator_memory(cfg, num_generated=4096 * 4096)
    gi = QPAConfig(**SMALL, backend="aer_shots", shots=10, generative_interpolation=True, gi_hidden_sizes=[256, 256])
    check_generator_memory(gi, num_generated=8 * 2**4)
    with pytest.raises(ValueError, match=r"QPAConfig\.gi_hidden_sizes"):  # 2^20 states x 512 activations
        check_generator_memory(gi, num_generated=8 * 2**20)


def test_memory_estimate_is_not_far_below_a_real_training_step():
    """The estimate of the output layer must cover what one Adam step on the generator really holds."""
    import resource

    from peft_qpa.generator import QPAGenerator, TensorSpec

    chunk = 2**19
    cfg = QPAConfig(target_modules=["q_proj"], chunk_size=chunk, mapping_hidden_sizes=[32], qnn_depth=1)
    estimate = sum(b for _, b in config_module.estimate_memory(cfg, num_generated=100).values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gen = QPAGenerator([TensorSpec("a", (100,))], depth=1, chunk_size=chunk, hidden_sizes=(32,))
    opt = torch.optim.Adam(gen.parameters())
    for _ in range(2):
        (gen.generate() ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    params = sum(p.numel() for p in gen.parameters()) * 4
    assert estimate >= 4 * params  # weight, gradient and Adam's two moments at least
    if used > 4 * params:  # peak RSS only rises: measurable when this process had not been bigger before
        assert estimate >= used * 0.8
