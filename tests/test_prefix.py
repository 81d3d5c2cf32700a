"""QPA prefix tuning (``QPAPrefixTuningConfig``, saved as ``QPA_PREFIX_TUNING``) and ``peft_qpa.export``."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    PrefixTuningConfig,
    get_peft_model,
    set_peft_model_state_dict,
)
from peft.tuners.prefix_tuning.model import PrefixEncoder
from peft.utils import load_peft_weights
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import peft_qpa
from peft_qpa import QPAPrefixTuningConfig, QTConfig
from peft_qpa.patches import apply_patches
from peft_qpa.tuners.prefix.model import GRADIENT_CHECKPOINTING_MESSAGE

try:
    from .tiny_models import MODEL_FACTORIES, small_config
except ImportError:
    from tiny_models import MODEL_FACTORIES, small_config

SMALL = dict(chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16, 16])
P = 4  # virtual tokens
SEED = 3


def qpa_prefix(arch, seed=SEED, **overrides):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=P, seed=seed, **SMALL)
    kwargs.update(overrides)
    return get_peft_model(MODEL_FACTORIES[arch](), QPAPrefixTuningConfig(**kwargs))


def plain_prefix(arch, seed=SEED, **overrides):
    base = MODEL_FACTORIES[arch]()
    torch.manual_seed(seed)  # PEFT's PrefixEncoder draws its embedding from the global RNG
    return get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **overrides))


def batch():
    """A left-padded batch: row 1 has two pad positions in front."""
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def step_by_step(model, ids, mask, steps):
    """Greedy decoding with the model's forward on the whole sequence at every step (no cache), position ids as
    ``generate()`` numbers them (from the attention mask). Returns the sequences and each step's scores."""
    ids, mask, scores = ids.clone(), mask.clone(), []
    for _ in range(steps):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(scores, 1)


def prefixes(model):
    return model.prompt_encoder["default"].embedding.weight.detach()


# --- the start: PEFT's prefix tuning with the same seed --------------------------------------------------------
def test_start_equals_peft_prefix_tuning(arch):
    ours, plain = qpa_prefix(arch).eval(), plain_prefix(arch).eval()
    # Each prefix is init + (f(θ) - f(θ0)): equal to PEFT's N(0, 1) init up to the float32 rounding of that sum.
    torch.testing.assert_close(prefixes(ours), prefixes(plain), rtol=0, atol=1e-6)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   rtol=0, atol=1e-5)


def test_zero_init_is_exact():
    ours, plain = qpa_prefix("gpt2", init_weights="zero").eval(), plain_prefix("gpt2", init_weights="zero").eval()
    assert torch.equal(prefixes(ours), torch.zeros_like(prefixes(ours)))
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(ours(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)


def test_reproducible_from_seed_and_leaves_global_rng_alone():
    base = MODEL_FACTORIES["llama"]()
    torch.manual_seed(123)
    a = get_peft_model(base, QPAPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, seed=SEED, **SMALL))
    after_a = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_a, torch.rand(3))  # building the adapter did not draw from the global RNG
    torch.manual_seed(999)
    b = qpa_prefix("llama")
    assert torch.equal(prefixes(a), prefixes(b))
    for (name, pa), (_, pb) in zip(a.prompt_encoder.named_parameters(), b.prompt_encoder.named_parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.allclose(prefixes(a), prefixes(qpa_prefix("llama", seed=SEED + 1)))


def test_layout_and_summary():
    model = qpa_prefix("llama")
    config = model.peft_config["default"]
    encoder = model.prompt_encoder["default"]
    # PEFT's layout without projection: P x (num_layers * 2 * token_dim); tiny Llama has grouped-query attention
    # (2 key/value heads of 8), so token_dim is the key/value width 16, as PEFT computes it
    assert (config.num_layers, config.token_dim) == (2, 16)
    assert tuple(prefixes(model).shape) == (P, 2 * 2 * 16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == encoder.generator.num_trainable() > 0
    summary = encoder.generator_summary()
    assert f"generated numbers M: {P * 64}" in summary and "qubits N:" in summary
    assert "ratio to classical prefix tuning" in summary and f"/ {P * 64})" in summary


# --- training ------------------------------------------------------------------------------------------------
def test_gradients_reach_every_generator_parameter(arch):
    model = qpa_prefix(arch).train()
    ids, mask = batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    generator = model.prompt_encoder["default"].generator
    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prompt_encoder" not in n)


def test_training_lowers_the_loss(arch):
    model = qpa_prefix(arch).train()
    ids, mask = batch()
    angles = model.prompt_encoder["default"].generator.angles.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert not torch.equal(angles, model.prompt_encoder["default"].generator.angles)
    assert int(model.prompt_encoder["default"].generator.step) == 8


def test_bf16_autocast_is_safe():
    model = qpa_prefix("llama").train()
    before = prefixes(model).clone()
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.prompt_encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    # the generator computes in its own dtype under autocast: the prefixes are those of float32
    assert torch.equal(prefixes(model), before)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits.float()).all()


# --- save / load ---------------------------------------------------------------------------------------------
def _trained(arch, steps=3):
    model = qpa_prefix(arch).train()
    ids, mask = batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_save_load_identical_logits(arch, tmp_path):
    model = _trained(arch)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QPA_PREFIX_TUNING" and saved["num_virtual_tokens"] == P
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert "prompt_embeddings" in weights and "qpa_prefix_generator.angles" in weights
    assert torch.equal(weights["prompt_embeddings"], prefixes(model).cpu())

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no snapshot/generator disagreement
        reloaded = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    assert isinstance(reloaded.peft_config["default"], QPAPrefixTuningConfig)
    assert reloaded.peft_config["default"].peft_type == "PREFIX_TUNING"
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, expected)

    # continuing training: a trainable adapter from the saved config, then the saved weights (generator included)
    config = QPAPrefixTuningConfig.from_pretrained(tmp_path)
    config.inference_mode = False  # saved adapters are written with inference_mode=True
    again = get_peft_model(MODEL_FACTORIES[arch](), config)
    set_peft_model_state_dict(again, load_peft_weights(str(tmp_path)))
    old, new = model.prompt_encoder["default"].generator, again.prompt_encoder["default"].generator
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, expected)
    assert any(p.requires_grad for p in again.parameters())


def test_load_warns_when_generator_and_prefixes_disagree(tmp_path):
    model = _trained("gpt2")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["qpa_prefix_generator.angles"] = weights["qpa_prefix_generator.angles"] + 1.0
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="disagree"):
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path)


# --- generate() ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_step_by_step_greedy(arch, use_cache):
    model = _trained(arch, steps=2)
    ids, mask = batch()
    steps = 5
    expected, expected_scores = step_by_step(model, ids, mask, steps)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         use_cache=use_cache, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(torch.stack(out.scores, 1), expected_scores, rtol=0, atol=1e-4)
    # each padded row decodes as it does alone, unpadded
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        tokens, _ = step_by_step(model, alone, torch.ones_like(alone), steps)
        assert torch.equal(tokens[0, -steps:], expected[row, -steps:])
    # and the prefix matters: the base model's scores differ
    with model.disable_adapter(), torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert not torch.allclose(base, expected_scores[:, 0], atol=1e-3)


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("num_virtual_tokens", 0), ("num_virtual_tokens", "4"), ("init_weights", "normal"), ("prefix_projection", True),
     ("task_type", None), ("chunk_size", 0), ("seed", -1), ("token_dim", 0)],
)
def test_bad_config_names_the_field(field, value):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=P, **SMALL)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"QPAPrefixTuningConfig.{field}"):
        QPAPrefixTuningConfig(**kwargs)


def test_gradient_checkpointing_is_refused():
    base = MODEL_FACTORIES["llama"]()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(base, QPAPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **SMALL))
    # turned on later (as a Trainer does): the training forward refuses
    model = qpa_prefix("llama").train()
    model.gradient_checkpointing_enable()
    ids, mask = batch()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids, attention_mask=mask, labels=ids)
    assert "prefix tuning" in GRADIENT_CHECKPOINTING_MESSAGE


# --- the HF Trainer ------------------------------------------------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 97, (10,), generator=g) for _ in range(4)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i], "attention_mask": torch.ones_like(self.items[i])}


def test_trainer_smoke(tmp_path):
    model = qpa_prefix("gpt2")
    angles = model.prompt_encoder["default"].generator.angles.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Batches())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert not torch.equal(angles, model.prompt_encoder["default"].generator.angles)
    checkpoint = tmp_path / "checkpoint-3"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "QPA_PREFIX_TUNING"
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), checkpoint)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


# --- export --------------------------------------------------------------------------------------------------
def test_export_errors():
    qt = get_peft_model(MODEL_FACTORIES["gpt2"](), QTConfig(target_modules=["c_proj"], **SMALL, seed=0))
    with pytest.raises(ValueError, match="merge_and_unload"):
        peft_qpa.export(qt, "unused")

    class Stub:
        def __init__(self, peft_type):
            self.peft_config = {"default": type("C", (), {"peft_type": peft_type})()}

    for kind in ("QPA_BOTTLENECK", "BOTTLENECK"):
        with pytest.raises(ValueError, match="no plain-PEFT equivalent"):
            peft_qpa.export(Stub(kind), "unused")
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        peft_qpa.export(qt, "unused", adapter_name="other")
    assert peft_qpa.export.__module__ == "peft_qpa.apps.export"


def test_export_delegates_lora(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["gpt2"](), small_config("gpt2"))
    written = peft_qpa.export(model, tmp_path / "lora")
    assert isinstance(written, LoraConfig)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_export_refuses_to_overwrite_our_adapter(tmp_path):
    model = qpa_prefix("gpt2")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="overwrite"):
        peft_qpa.export(model, tmp_path)


# Run twice: in a subprocess that never imports peft_qpa, and here (peft_qpa imported). Plain PEFT prefix tuning
# and LoRA must give the same logits and generate() in both; the exported adapter is loaded by plain peft.
PROBE = r'''
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM


def run(paths, exported):
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    results = {}
    for arch, path in paths.items():
        for kind in ("prefix", "lora"):
            base = AutoModelForCausalLM.from_pretrained(path).eval()
            torch.manual_seed(7)
            if kind == "prefix":
                config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
            else:
                config = LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False,
                                    target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])
            model = get_peft_model(base, config).eval()
            with torch.no_grad():
                results[f"{arch}-{kind}-logits"] = model(input_ids=ids, attention_mask=mask).logits
            for use_cache in (True, False):
                results[f"{arch}-{kind}-generate-{use_cache}"] = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                    pad_token_id=0)
        if arch in exported:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path).eval(), exported[arch]).eval()
            assert type(model.prompt_encoder["default"]).__name__ == "PrefixEncoder"
            with torch.no_grad():
                results[f"{arch}-exported-logits"] = model(input_ids=ids, attention_mask=mask).logits
    return results
'''


def test_export_exact_and_plain_peft_unaffected(tmp_path):
    paths, exported, expected = {}, {}, {}
    ids, mask = batch()
    for arch in ("llama", "gpt2"):
        paths[arch] = str(tmp_path / f"base-{arch}")
        MODEL_FACTORIES[arch]().save_pretrained(paths[arch])
        model = _trained(arch, steps=2)
        exported[arch] = str(tmp_path / f"exported-{arch}")
        written = peft_qpa.export(model, exported[arch])
        assert isinstance(written, PrefixTuningConfig) and not written.prefix_projection
        assert json.loads((tmp_path / f"exported-{arch}" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
        assert set(load_file(tmp_path / f"exported-{arch}" / "adapter_model.safetensors")) == {"prompt_embeddings"}
        with torch.no_grad():
            expected[arch] = model(ids, attention_mask=mask).logits

    script = tmp_path / "probe.py"
    script.write_text(PROBE + f'''
import sys
results = run({paths!r}, {exported!r})
assert "peft_qpa" not in sys.modules
torch.save(results, {str(tmp_path / "plain.pt")!r})
''')
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")

    for arch in ("llama", "gpt2"):  # the exported twin, loaded by plain peft, gives our logits
        assert torch.equal(plain[f"{arch}-exported-logits"], expected[arch])
    namespace = {}
    exec(PROBE, namespace)
    here = namespace["run"](paths, {})
    assert set(here) == {k for k in plain if "exported" not in k}
    for key, value in here.items():  # same outputs and generate() with peft_qpa imported
        assert torch.equal(value, plain[key]), key


def test_hooks_are_installed_once_and_only_for_ours():
    apply_patches()
    peft_qpa.register_qpa()
    apply_patches()
    from peft import PeftModel as Base

    setup = Base._setup_prompt_encoder
    assert setup.__peft_qpa__ and not getattr(setup.__wrapped__, "__peft_qpa__", False)
    prepare = PeftModelForCausalLM.prepare_inputs_for_generation
    assert prepare.__peft_qpa__ and not getattr(prepare.__wrapped__, "__peft_qpa__", False)
    saver = PrefixEncoder.__dict__["_get_adapter_state_dict"].__func__
    assert saver.__peft_qpa__
    plain = plain_prefix("gpt2")
    assert type(plain.prompt_encoder["default"]) is PrefixEncoder
    from peft.utils import get_peft_model_state_dict

    assert set(get_peft_model_state_dict(plain)) == {"prompt_embeddings"}
