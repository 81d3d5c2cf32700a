"""The QPA authors' configuration, selectable by name: an affine mapping (``mapping_activation="none"``), basis bits of
a random assignment at every training forward (``basis_features="shuffled"``) or none at all (``"none"``), and the
whole published configuration in one step (``QPAConfig.published``)."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa
from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec
from peft_qpa.generator.config import PUBLISHED_GENERATOR

from tiny_models import MODEL_FACTORIES, small_config, train_steps

SMALL = dict(qnn_depth=2, chunk_size=8, mapping_hidden_sizes=[8, 8], seed=3)


def generator(**overrides):
    config = GeneratorConfig(**{**SMALL, **overrides})
    return QPAGenerator.from_config(config, [TensorSpec("w", (50, 10), "kaiming_uniform"), TensorSpec("b", (30,))])


def chunks(g, training=False, step=None):
    """The raw mapping output (n_chunks x chunk_size) of one generation."""
    step = int(g.step) if step is None else step
    with torch.no_grad():
        return g.mapping(g.mapping_input(g.features(step), bits=g.basis_matrix(step, training)))


def test_identity_activation_makes_the_mapping_affine_with_the_same_key_layout():
    affine, gelu = generator(mapping_activation="none"), generator()
    width = affine.mapping[0].in_features
    a, b = torch.randn(width), torch.randn(width)
    with torch.no_grad():
        torch.testing.assert_close(affine.mapping((a + b) / 2), (affine.mapping(a) + affine.mapping(b)) / 2)
    assert affine.state_dict().keys() == gelu.state_dict().keys()


def test_shuffled_bits_are_a_fresh_assignment_per_training_step_reproducible_from_seed_and_step():
    g = generator(basis_features="shuffled")
    first, again, second = g.basis_matrix(1, True), g.basis_matrix(1, True), g.basis_matrix(2, True)
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(first, generator(basis_features="shuffled").basis_matrix(1, True))  # same seed: same draw
    assert not torch.equal(first, generator(basis_features="shuffled", seed=4).basis_matrix(1, True))
    # distinct basis states: no two chunks get the same bits
    assert len({tuple(row.tolist()) for row in first}) == g.n_chunks
    assert set(first.unique().tolist()) == {-1.0, 1.0}
    # outside training: the expectation, zero bits
    assert torch.equal(g.basis_matrix(1, False), torch.zeros_like(first))


def test_shuffled_eval_is_the_expectation_of_training_for_an_affine_mapping():
    g = generator(basis_features="shuffled", mapping_activation="none")
    expected = chunks(g)
    draws = torch.stack([chunks(g, training=True, step=s) for s in range(400)])
    assert not torch.allclose(draws[0], expected)  # a training generation is noisy ...
    spread = draws.std(0).max()
    assert (draws.mean(0) - expected).abs().max() < 4 * spread / 400**0.5  # ... around the eval one


def test_without_bits_an_affine_mapping_gives_a_chunk_grid_of_rank_two():
    g = generator(basis_features="none", mapping_activation="none")
    assert g.mapping[0].in_features == 1  # the probability feature alone
    assert torch.linalg.matrix_rank(chunks(g).double(), rtol=1e-5) <= 2
    with_bits = generator(mapping_activation="none")
    assert torch.linalg.matrix_rank(chunks(with_bits).double(), rtol=1e-5) > 2


def test_only_training_draws_and_the_step_sequence_resumes(input_ids, tmp_path):
    config = small_config("llama", basis_features="shuffled", mapping_activation="none")
    model = get_peft_model(MODEL_FACTORIES["llama"](), config)
    base = MODEL_FACTORIES["llama"]()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)  # zero start
    train_steps(model, input_ids, steps=2)
    with torch.no_grad():
        eval_a, eval_b = model(input_ids).logits, model(input_ids).logits
    assert torch.equal(eval_a, eval_b)  # eval is deterministic
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, eval_a)
    # the next training forward draws the same assignment in the saved model and in the reloaded one
    losses = [m(input_ids, labels=input_ids).loss.item() for m in (model.train(), reloaded.train())]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_the_published_configuration_in_one_step():
    config = peft_qpa.QPAConfig.published()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (4, 8, 0.05, {"lm_head"})
    for name, value in PUBLISHED_GENERATOR.items():
        assert getattr(config, name) == value, name
    overridden = peft_qpa.QPAConfig.published(chunk_size=64, target_modules=["q_proj"], seed=7)
    assert (overridden.chunk_size, overridden.target_modules, overridden.seed) == (64, {"q_proj"}, 7)
    assert overridden.basis_features == "shuffled"


@pytest.mark.parametrize("member", ["qt", "bottleneck", "prefix"])
def test_the_published_generator_works_on_every_member(member, input_ids):
    generator_fields = {**PUBLISHED_GENERATOR, "chunk_size": 16, "qnn_depth": 2}
    config = {
        "qt": lambda: peft_qpa.QTConfig(target_modules=["q_proj"], **generator_fields),
        "bottleneck": lambda: peft_qpa.QPABottleneckConfig(target_modules=["mlp"], bottleneck_size=4, **generator_fields),
        "prefix": lambda: peft_qpa.QPAPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **generator_fields),
    }[member]()
    model = get_peft_model(MODEL_FACTORIES["llama"](), config)

    def eval_loss():  # the expected tensors: training losses carry the shuffled bits' noise
        with torch.no_grad():
            return model.eval()(input_ids, labels=input_ids).loss.item()

    before = eval_loss()
    train_steps(model, input_ids, steps=10, lr=1e-2)
    assert eval_loss() < before


@pytest.mark.parametrize("value", ["random", 1, None])
def test_bad_basis_features_are_refused(value):
    with pytest.raises(ValueError, match=r"QPAConfig\.basis_features must be one of \('bits', 'shuffled', 'none'\)"):
        peft_qpa.QPAConfig(basis_features=value)
