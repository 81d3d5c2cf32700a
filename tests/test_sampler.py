"""backend='sampler': the hardware path through Qiskit SamplerV2 primitives (qiskit-ibm-runtime's in local mode on a
fake device, Aer's), one job per step, the zero start, faults and resume, the cost guard, save/load without a sampler."""

import dataclasses
import json
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from qiskit.primitives import BackendSamplerV2
from qiskit.primitives.containers import BitArray, DataBin, PrimitiveResult, SamplerPubResult
from qiskit.providers.fake_provider import GenericBackendV2
from qiskit.quantum_info import Statevector
from qiskit_aer.primitives import SamplerV2 as AerSampler
from transformers import Trainer, TrainingArguments

import peft_qpa
from peft_qpa.generator.backends.aer import derive_seed
from peft_qpa.generator.backends.sampler import sampler_backends
from tiny_models import tiny_gpt2, small_config, train_steps

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*SamplerV2 class is deprecated"),
    pytest.mark.filterwarnings("ignore:.*have no effect in local testing mode"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),
]

IDS = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def sampler_model(**overrides):
    """tiny GPT-2, c_attn only: M = 1024 in chunks of 64, so N = 4 qubits, depth 2, P = 8 angles."""
    kwargs = dict(target_modules=["c_attn"], chunk_size=64, backend="sampler", shots_per_state=64, sampler_backoff_s=0.0)
    kwargs.update(overrides)
    return get_peft_model(tiny_gpt2(), small_config("gpt2", **kwargs))


def generator(model, name="default"):
    return model.base_model.get_generator(name)


def backend(model):
    (only,) = sampler_backends(generator(model))
    return only


class CountingAer(AerSampler):
    """Aer's SamplerV2 counting its jobs and recording each job's seed and bound-parameter shape."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.jobs = []

    def run(self, pubs, *, shots=None):
        self.jobs.append((self._seed, np.shape(pubs[0][1])))
        return super().run(pubs, shots=shots)


def runtime_sampler(client_side=False):
    """qiskit-ibm-runtime's SamplerV2 (deprecated since 0.50), or with ``client_side`` its successor, the client-side
    ``executor_sampler.Sampler``, in local mode on FakeManilaV2, counting its jobs' seeds."""
    runtime = pytest.importorskip("qiskit_ibm_runtime")
    from qiskit_ibm_runtime.fake_provider import FakeManilaV2

    if client_side:
        executor = pytest.importorskip("qiskit_ibm_runtime.executor_sampler")
        primitive = executor.Sampler
    else:
        primitive = runtime.SamplerV2

    class CountingRuntime(primitive):
        def run(self, pubs, *, shots=None):
            self.jobs = getattr(self, "jobs", []) + [self.options.simulator.seed_simulator]
            return super().run(pubs, shots=shots)

    return CountingRuntime(mode=FakeManilaV2())


def base_loss(ids=IDS):
    with torch.no_grad():
        return tiny_gpt2()(ids, labels=ids).loss.item()


# --------------------------------------------------------------------------------------------------
# Training through a sampler: one job per step, the zero start, seeds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,gradient", [("runtime", "exact"), ("client_side", "exact"), ("aer", "parameter_shift")])
def test_training_runs_one_job_per_step_from_the_base_model(kind, gradient):
    model = sampler_model(shot_gradient=gradient)
    sampler = CountingAer(seed=0) if kind == "aer" else runtime_sampler(client_side=kind == "client_side")
    placeholder_offset = generator(model).offset.clone()  # from the exact probabilities (no sampler at construction)
    assert peft_qpa.use_sampler(model, sampler) == ["default"]
    assert len(sampler.jobs) == 1  # the step-0 job, run once to re-anchor the zero start
    # the device's step 0 differs from the placeholder, so the offset had to move for the zero start to hold
    assert (generator(model).offset - placeholder_offset).abs().max() > 1e-4

    losses = train_steps(model, IDS, steps=5, lr=2e-2)
    assert len(sampler.jobs) == 5  # training step 0 reused the attach-time job; steps 1-4 one job each
    assert losses[0] == base_loss()  # step 0's delta is exactly zero (B = 0 exactly, on the sampled probabilities)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert int(generator(model).step) == 5
    if kind != "aer":  # every job seeded from (seed, step)
        assert sampler.jobs == [derive_seed(0, step) for step in range(5)]
        assert sampler.options.simulator.seed_simulator == derive_seed(0, 4)
        assert model.peft_config["default"].sampler_backend_name == "fake_manila"
    else:
        circuits = 2 * generator(model).angles.numel() + 1  # the circuit and its 2P shifted copies, in one PUB
        assert [shape for _, shape in sampler.jobs] == [(circuits, 8)] * 5
        assert [seed for seed, _ in sampler.jobs] == [derive_seed(0, step) for step in range(5)]
        assert model.peft_config["default"].sampler_backend_name == "aer_simulator"


def test_probabilities_agree_with_the_statevector_within_shot_noise():
    model = sampler_model(shots_per_state=None, shots=20_000)
    peft_qpa.use_sampler(model, AerSampler(seed=3))
    gen = generator(model)
    probs = gen.probabilities(step=7).detach().double().numpy()
    circuit = gen.circuit()  # the current angles bound
    exact = Statevector(circuit).probabilities()
    assert backend(model).result_counts.sum() == 20_000
    # E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / S) <= 0.5 * sqrt(2^N / S); allow 4x that
    bound = 2 * math.sqrt(len(exact) / 20_000)
    tv = 0.5 * np.abs(probs - exact).sum()
    assert tv < bound, (tv, bound)
    # the bound is tight enough to see a wrong bit order or other angles
    reversed_order = exact.reshape([2] * gen.n_qubits).transpose().reshape(-1)
    assert 0.5 * np.abs(probs - reversed_order).sum() > bound
    other = Statevector(gen.circuit(bound=False).assign_parameters(np.zeros(gen.angles.numel()) + 0.7)).probabilities()
    assert 0.5 * np.abs(probs - other).sum() > bound


def test_each_readout_and_sub_circuit_gets_the_sampler():
    model = sampler_model(probability_input="multi_readout", readout_settings=2)
    sampler = CountingAer(seed=0)
    peft_qpa.use_sampler(model, sampler)
    assert len(sampler_backends(generator(model))) == 2 and len(sampler.jobs) == 2
    train_steps(model, IDS, steps=2)
    assert len(sampler.jobs) == 4  # K = 2 jobs per step
    assert peft_qpa.estimate_cost(model, 3).jobs_per_step == 2
    # readout k of step s is seeded from step s * K + k
    assert [seed for seed, _ in sampler.jobs] == [derive_seed(0, s) for s in (0, 1, 2, 3)]

    model = sampler_model(probability_input="distributed", circuit_groups=2)
    sampler = CountingAer(seed=0)
    peft_qpa.use_sampler(model, sampler)
    assert [b.n_qubits for b in sampler_backends(generator(model))] == [2, 2] and len(sampler.jobs) == 2


# --------------------------------------------------------------------------------------------------
# No sampler: construction, loading and inference need none; training does
# --------------------------------------------------------------------------------------------------


def test_a_forward_that_needs_the_circuit_says_to_attach_a_sampler():
    model = sampler_model()  # built without a sampler
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, tiny_gpt2()(IDS).logits, rtol=0, atol=0)  # untrained = base
    model.train()
    with pytest.raises(peft_qpa.SamplerNotAttachedError, match=r"peft_qpa\.use_sampler\(model, sampler\)"):
        model(IDS, labels=IDS)
    assert int(generator(model).step) == 0


def test_save_load_and_inference_without_a_sampler(tmp_path):
    model = sampler_model(shot_gradient="parameter_shift")
    peft_qpa.use_sampler(model, runtime_sampler())
    train_steps(model, IDS, steps=2)
    with torch.no_grad():
        trained = model(IDS).logits  # eval: the snapshot, regenerated by one job at the current step
    assert not torch.equal(trained, tiny_gpt2()(IDS).logits)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["backend"] == "sampler" and saved["sampler_backend_name"] == "fake_manila"
    assert "device: fake_manila" in (tmp_path / "README.md").read_text()

    with warnings.catch_warnings():
        # the load cross-check reproduces the snapshot from the kept device result (else it warns "... disagree")
        warnings.filterwarnings("error", message=".*disagree")
        loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, trained, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # saving and moving need no sampler either
    loaded.to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits.float(), trained, rtol=1e-5, atol=1e-5)

    trainable = PeftModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    trainable.train()
    with pytest.raises(peft_qpa.SamplerNotAttachedError, match="use_sampler"):
        trainable(IDS, labels=IDS)
    # an old config without the sampler fields loads with their defaults
    old = {k: v for k, v in saved.items() if not k.startswith("sampler_") and k != "max_device_seconds"}
    config = peft_qpa.QPAConfig.from_peft_type(**old)
    assert config.sampler_retries == 3 and config.max_device_seconds is None and config.sampler_backend_name is None


def test_a_device_with_too_few_qubits_is_refused():
    model = sampler_model()  # N = 4
    small = BackendSamplerV2(backend=GenericBackendV2(num_qubits=3, seed=0))
    with pytest.raises(ValueError, match=r"has 3 qubits, but this circuit needs 4.*chunk_size.*distributed"):
        peft_qpa.use_sampler(model, small)
    assert not backend(model).attached


# --------------------------------------------------------------------------------------------------
# Faults: retries, timeouts, wrong results, a Trainer run stopped and resumed
# --------------------------------------------------------------------------------------------------


class _Hanging:
    def result(self):
        threading.Event().wait(3)

    def cancel(self):
        pass


class FlakyAer(CountingAer):
    """Fails (an exception, or a job that never returns) on the calls listed in ``fail_on`` (1-based), or on every
    call once ``broken``."""

    def __init__(self, fail_on=(), hang_on=(), **kwargs):
        super().__init__(**kwargs)
        self.fail_on, self.hang_on, self.broken, self.calls = set(fail_on), set(hang_on), False, 0

    def run(self, pubs, *, shots=None):
        self.calls += 1
        if self.broken or self.calls in self.fail_on:
            raise ConnectionError("the device went offline")
        if self.calls in self.hang_on:
            return _Hanging()
        return super().run(pubs, shots=shots)


def test_failed_and_timed_out_jobs_are_retried():
    model = sampler_model(sampler_timeout_s=0.3)
    sampler = FlakyAer(fail_on={1}, hang_on={3}, seed=0)
    peft_qpa.use_sampler(model, sampler)  # call 1 fails, call 2 (the retry) runs the step-0 job
    assert sampler.calls == 2 and backend(model).has_device_result
    losses = train_steps(model, IDS, steps=3)  # step 1: call 3 hangs past the timeout, call 4 succeeds
    assert sampler.calls == 5 and int(generator(model).step) == 3 and losses[0] == base_loss()


def test_persistent_failure_raises_and_the_model_stays_at_its_last_step():
    model = sampler_model(sampler_retries=2)
    sampler = FlakyAer(seed=0)
    peft_qpa.use_sampler(model, sampler)
    train_steps(model, IDS, steps=1)
    before = {k: v.clone() for k, v in generator(model).state_dict().items()}
    sampler.broken = True
    model.train()
    with pytest.raises(peft_qpa.SamplerJobError, match=r"step 1 .*failed 3 time\(s\).*ConnectionError: the device went offline"):
        model(IDS, labels=IDS)
    after = generator(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and int(generator(model).step) == 1


class Doctored(AerSampler):
    """Aer's SamplerV2 whose results are altered by ``doctor`` (a function of the real result)."""

    def __init__(self, doctor, **kwargs):
        super().__init__(**kwargs)
        self.doctor, self.calls = doctor, 0

    def run(self, pubs, *, shots=None):
        self.calls += 1
        result = super().run(pubs, shots=shots).result()
        done = self.doctor(result)

        class Job:
            def result(self):
                return done

        return Job()


def _narrower(result):
    bits = result[0].data.meas
    narrow = BitArray.from_samples([s[1:] for s in bits.get_bitstrings()], num_bits=bits.num_bits - 1)
    narrow = BitArray(narrow.array.reshape(bits.shape + (bits.num_shots, -1)), narrow.num_bits)
    return PrimitiveResult([SamplerPubResult(DataBin(meas=narrow, shape=bits.shape))])


@pytest.mark.parametrize("doctor,message", [
    (lambda r: PrimitiveResult([r[0], r[0]]), "1 PUB but its result has 2 PUB results"),
    (_narrower, "bitstrings of 3 bits, but the circuit measures 4 qubits"),
])
def test_a_result_that_does_not_fit_the_job_is_an_error(doctor, message):
    model = sampler_model()
    sampler = Doctored(doctor, seed=0)
    with pytest.raises(peft_qpa.SamplerResultError, match=message):
        peft_qpa.use_sampler(model, sampler)
    assert sampler.calls == 1  # a wrong result is not retried


class RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 97, (12,), generator=g) for _ in range(4)] * 4

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def _trainer(model, out, callbacks=(), max_steps=4):
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=2e-2, logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    return Trainer(model=model, args=args, train_dataset=RepeatedBatch(), callbacks=list(callbacks))


class BreakOnSave(peft_qpa.CostGuardCallback):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def on_save(self, args, state, control, **kwargs):
        self.sampler.broken = True


def test_a_trainer_run_stopped_by_a_failing_device_resumes_from_its_checkpoint(tmp_path):
    reference_sampler = FlakyAer(seed=0)
    reference = sampler_model(sampler_retries=1)
    peft_qpa.use_sampler(reference, reference_sampler)
    _trainer(reference, tmp_path / "reference").train()
    # jobs: the step-0 job (attach), step 1, the checkpoint at 2 (its job serves step 2), step 3, the checkpoint at 4
    assert [seed for seed, _ in reference_sampler.jobs] == [derive_seed(0, s) for s in (0, 1, 2, 3, 4)]

    sampler = FlakyAer(seed=0)
    model = sampler_model(sampler_retries=1)
    peft_qpa.use_sampler(model, sampler)
    with pytest.raises(peft_qpa.SamplerJobError, match="step 3"):  # the device fails for good after checkpoint-2
        _trainer(model, tmp_path / "run", callbacks=[BreakOnSave(sampler)]).train()
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "checkpoint-4").exists()

    resumed_sampler = FlakyAer(seed=0)
    resumed = sampler_model(sampler_retries=1)
    peft_qpa.use_sampler(resumed, resumed_sampler)
    trainer = _trainer(resumed, tmp_path / "run")
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    # after the attach-time job, the same steps with the same seeds as the uninterrupted run
    assert [seed for seed, _ in resumed_sampler.jobs][1:] == [derive_seed(0, s) for s in (3, 4)]
    assert int(generator(resumed).step) == 4
    for name, value in generator(reference).named_parameters():
        torch.testing.assert_close(dict(generator(resumed).named_parameters())[name], value)


# --------------------------------------------------------------------------------------------------
# The cost guard
# --------------------------------------------------------------------------------------------------


def test_estimate_cost_from_the_device_durations_and_the_default_model():
    model = sampler_model(shot_gradient="parameter_shift")
    unattached = peft_qpa.estimate_cost(model, 10)
    assert "default model" in unattached.method and unattached.circuits_per_step == 17
    assert "sampler: 1 job(s), 17 circuit(s)" in model.base_model.generator_summary()
    peft_qpa.use_sampler(model, runtime_sampler())
    estimate = peft_qpa.estimate_cost(model, 10)
    assert "device Target's gate and readout durations" in estimate.method and "fake_manila" in estimate.method
    per_shot = backend(model).timing().seconds_per_shot
    assert 250e-6 < per_shot < 300e-6  # fake_manila: about 7 us of gates and readout + 250 us repetition delay
    assert estimate.shots_per_step == 17 * 1024
    assert estimate.device_seconds_per_step == pytest.approx(17 * 1024 * per_shot)
    assert estimate.total_device_seconds == pytest.approx(10 * estimate.device_seconds_per_step)
    assert estimate.to_dict()["jobs_per_step"] == 1 and estimate.adapters == ["default"]


def test_the_cost_guard_refuses_an_over_budget_run_at_attach_time():
    model = sampler_model(max_device_seconds=1.0)
    sampler = CountingAer(seed=0)
    per_step = peft_qpa.estimate_cost(model, 1).device_seconds_per_step  # default model: about 0.26 s
    with pytest.raises(peft_qpa.DeviceBudgetError, match=r"10 steps would use about 2\.\d+ s .*max_device_seconds=1"):
        peft_qpa.use_sampler(model, sampler, max_steps=10)
    assert not sampler.jobs and not backend(model).attached
    peft_qpa.use_sampler(model, sampler, max_steps=int(1.0 / per_step))  # within the budget


def test_the_cost_guard_callback_refuses_before_the_first_job(tmp_path):
    model = sampler_model(max_device_seconds=0.5)
    sampler = CountingAer(seed=0)
    peft_qpa.use_sampler(model, sampler)
    jobs = len(sampler.jobs)
    with pytest.raises(peft_qpa.DeviceBudgetError, match=r"Trainer run of 4 steps from step 0: 4 steps would use"):
        _trainer(model, tmp_path, callbacks=[peft_qpa.CostGuardCallback()]).train()
    assert len(sampler.jobs) == jobs and int(generator(model).step) == 0


def test_the_backend_refuses_the_job_that_would_exceed_the_budget():
    model = sampler_model(max_device_seconds=0.7)
    sampler = CountingAer(seed=0)
    peft_qpa.use_sampler(model, sampler)  # job 1 (about 0.26 s each: 1024 shots x 257 us)
    train_steps(model, IDS, steps=2)  # step 0 reuses job 1, step 1 is job 2
    before = {k: v.clone() for k, v in generator(model).named_parameters()}
    model.train()
    with pytest.raises(peft_qpa.DeviceBudgetError, match=r"step 2 .*over max_device_seconds=0\.7 \(0\.5\d+ s used by 2 jobs"):
        model(IDS, labels=IDS)
    assert len(sampler.jobs) == 2 and int(generator(model).step) == 2
    assert all(torch.equal(before[k], v) for k, v in generator(model).named_parameters())


# --------------------------------------------------------------------------------------------------
# Options, readout mitigation, config fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client_side", [False, True], ids=["SamplerV2", "client-side Sampler"])
def test_sampler_options_and_readout_mitigation(client_side):
    model = sampler_model(sampler_twirling=True, sampler_dynamical_decoupling=True, readout_mitigation=True)
    sampler = runtime_sampler(client_side)
    peft_qpa.use_sampler(model, sampler)
    assert sampler.options.twirling.enable_gates is True and sampler.options.twirling.enable_measure is True
    assert sampler.options.dynamical_decoupling.enable is True
    matrices = backend(model).readout_matrices()  # fake_manila's readout errors on the measured physical qubits
    assert len(matrices) == 4 and all(m.shape == (2, 2) and 0 < m[0, 1] < 0.1 for m in matrices)
    kept = backend(model)
    raw = kept.result_counts.double() / kept.result_counts.sum()
    assert (kept.result_probs - raw).abs().max() > 1e-4 and kept.result_probs.min() >= 0
    assert float(kept.result_probs.sum()) == pytest.approx(1.0)


def test_sampler_fields_are_validated_and_saved():
    fields = {f.name: f for f in dataclasses.fields(peft_qpa.QPAConfig)}
    for name in ("sampler_optimization_level", "sampler_twirling", "sampler_dynamical_decoupling", "sampler_retries",
                 "sampler_timeout_s", "sampler_backoff_s", "max_device_seconds", "sampler_backend_name"):
        assert fields[name].metadata["help"]
    config = small_config("gpt2", backend="sampler", shots=100, max_device_seconds=30.5, sampler_retries=0)
    assert config.to_dict()["max_device_seconds"] == 30.5 and config.to_dict()["sampler_retries"] == 0
    bad = [
        (dict(backend="sampler", shots=10, sampler_optimization_level=4), "sampler_optimization_level must be"),
        (dict(backend="sampler", shots=10, sampler_timeout_s=0), "sampler_timeout_s must be"),
        (dict(backend="sampler", shots=10, max_device_seconds=-1.0), "max_device_seconds must be None"),
        (dict(backend="sampler"), "needs shots or shots_per_state"),
        (dict(sampler_retries=5), "only applies to backend='sampler'"),
        (dict(backend="sampler", shots=10, noise_model="fake_kyiv"), "noise_model does not apply to backend='sampler'"),
        (dict(backend="sampler", shots=10, save_generated_tensors=False), "save_generated_tensors=False does not apply"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            small_config("gpt2", **overrides)
    with pytest.raises(TypeError, match="BaseSamplerV2"):
        peft_qpa.use_sampler(sampler_model(), object())
    with pytest.raises(ValueError, match="backend='sampler'"):
        peft_qpa.use_sampler(get_peft_model(tiny_gpt2(), small_config("gpt2")), AerSampler())
