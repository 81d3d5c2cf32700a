"""The Aer backends, shots, noise and GI through the tuner: what a user of QPAConfig gets."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa

from tiny_models import MODEL_FACTORIES, small_config, train_steps as train


def adapted(**overrides):
    return get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama", **overrides))


def test_aer_statevector_matches_the_torch_backend(input_ids):
    torch_model = adapted(simulator_dtype="float64", init_weights=False)
    aer_model = adapted(simulator_dtype="float64", init_weights=False, backend="aer_statevector")
    torch_gen, aer_gen = (m.base_model.get_generator() for m in (torch_model, aer_model))
    torch.testing.assert_close(aer_gen.generate(), torch_gen.generate(), atol=1e-5, rtol=1e-5)
    for model in (torch_model, aer_model):
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
    assert aer_gen.angles.grad.abs().max() > 0
    torch.testing.assert_close(aer_gen.angles.grad, torch_gen.angles.grad, atol=1e-5, rtol=1e-4)


def test_shots_are_reproducible_by_seed_and_step(input_ids):
    a = adapted(backend="aer_shots", shots_per_state=2, init_weights=False)
    b = adapted(backend="aer_shots", shots_per_state=2, init_weights=False)
    gen_a, gen_b = a.base_model.get_generator(), b.base_model.get_generator()
    torch.testing.assert_close(gen_a.generate(), gen_b.generate(), rtol=0, atol=0)
    step0 = gen_a.probabilities(step=0)
    assert not torch.equal(step0, gen_a.probabilities(step=1))
    n_states = 2**gen_a.n_qubits
    counts = step0 * 2 * n_states
    torch.testing.assert_close(counts, counts.round(), atol=1e-3, rtol=0)  # frequencies of 2·2^N shots
    train(a, input_ids, 2)
    assert int(gen_a.step) == 2  # each training forward samples a new step


def test_generative_interpolation_trains_saves_and_loads(input_ids, tmp_path):
    model = adapted(backend="aer_shots", shots_per_state=1, generative_interpolation=True)
    generator = model.base_model.get_generator()
    assert generator.interpolation is not None
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    gi_grads = [p.grad for p in generator.interpolation.parameters()]
    assert all(g is not None and g.abs().max() > 0 for g in gi_grads)  # c = 1 leaves many states unobserved
    model.zero_grad()
    train(model, input_ids, 2)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path)
    for (name, p), (_, q) in zip(
        generator.interpolation.named_parameters(), reloaded.base_model.get_generator().interpolation.named_parameters()
    ):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=0, atol=0)


def test_noisy_device_training_lowers_the_loss(input_ids):
    model = adapted(backend="aer_shots", shots_per_state=20, noise_model="fake_kyiv", chunk_size=128)
    losses = train(model, input_ids, 8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses


def test_config_with_a_noise_model_object_saves_to_json(tmp_path):
    from qiskit_aer.noise import NoiseModel, depolarizing_error

    noise = NoiseModel()
    noise.add_all_qubit_quantum_error(depolarizing_error(0.01, 1), ["ry"])
    config = small_config("llama", backend="aer_shots", shots=256, noise_model=noise)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["noise_model"], dict)
    loaded = peft_qpa.QPAConfig.from_pretrained(tmp_path)
    model = get_peft_model(MODEL_FACTORIES["llama"](), loaded)
    assert model.base_model.get_generator().probabilities().shape[0] == 2 ** model.base_model.get_generator().n_qubits


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(backend="aer_shots", shots=0), "shots"),
        (dict(backend="aer_shots"), "needs shots or shots_per_state"),
        (dict(generative_interpolation=True), "only applies to backend='aer_shots'"),
        (dict(noise_model="fake_kyiv"), "noise_model needs an Aer backend"),
    ],
)
def test_bad_backend_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config("llama", **overrides)


def test_unknown_device_lists_the_available_ones():
    with pytest.raises(ValueError, match="fake_kyiv"):
        adapted(backend="aer_shots", shots=64, noise_model="fake_atlantis")
