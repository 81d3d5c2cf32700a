"""QPA on a 4-bit base (bitsandbytes ``Linear4bit`` targets, as QLoRA users run LoRA): train, save, reload, export and
merge, with QPA-LoRA and QPA-DoRA.

The targets are wrapped by QPA's own Linear layer, which reads and writes the 4-bit weight through PEFT's quantization
backend for bitsandbytes (``Bnb4bitBackend``: the dequantized weight for DoRA's norm and merging, a requantized one
after a merge, the defensive clone of the base output), as PEFT's LoRA ``Linear4bit`` does. The exported twin loads as
PEFT's own ``lora.bnb.Linear4bit``.

Runs where bitsandbytes quantizes to 4 bits on this machine's device (its CPU backend since 0.45, or CUDA); skips
elsewhere. The model's widths are multiples of 64: bitsandbytes' CPU inference path cannot repack 4-bit weights
whose input width is below its block size of 64.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft_qpa  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _probe_4bit() -> str | None:
    """Why 4-bit bitsandbytes does not run on DEVICE here, or None."""
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(DEVICE)
        layer(torch.randn(2, 64, device=DEVICE))
    except Exception as exc:  # noqa: BLE001 - any failure means: no 4-bit here
        return f"{type(exc).__name__}: {exc}"
    return None


_reason = _probe_4bit()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"bitsandbytes 4-bit does not run on {DEVICE}: {_reason}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("base4bit")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=DEVICE)


IDS = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS.to(DEVICE)).logits.float().cpu()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qpa_on_4bit_targets_trains_saves_reloads_exports_and_merges(base_dir, tmp_path, use_dora):
    config = peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=TARGETS, chunk_size=16, qnn_depth=2,
                                mapping_hidden_sizes=[16, 16], use_dora=use_dora, seed=0)
    model = get_peft_model(_load_4bit(base_dir), config)
    layers = [m for m in model.modules() if isinstance(m, peft_qpa.QPALayer)]
    assert len(layers) == 6
    for layer in layers:
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        assert layer.quantization_backend is not None and layer.quantization_backend.backend_name == "bnb 4bit"

    # identity at the start. Checked with gradients on: in eval without gradients, bitsandbytes' CPU path repacks the
    # 4-bit weight, and the DoRA norm of the repacked weight differs (PEFT's own DoRA on Linear4bit does the same)
    ids = IDS.to(DEVICE)
    model.train()
    start = model(ids).logits
    with model.disable_adapter():
        base = model(ids).logits
    assert torch.equal(start, base)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = _logits(model)

    model.save_pretrained(tmp_path / "qpa")
    reloaded = PeftModel.from_pretrained(_load_4bit(base_dir), str(tmp_path / "qpa"))
    torch.testing.assert_close(_logits(reloaded), trained, rtol=0, atol=1e-6)

    peft_qpa.export(model, tmp_path / "twin")
    twin = PeftModel.from_pretrained(_load_4bit(base_dir), str(tmp_path / "twin"))
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    assert sum(isinstance(m, LoraLinear4bit) for m in twin.modules()) == 6
    torch.testing.assert_close(_logits(twin), trained, rtol=0, atol=1e-5)

    # merging requantizes the weight: exactly what PEFT's merge of the exported twin gives
    merged = reloaded.merge_and_unload()
    twin_merged = twin.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(_logits(merged), _logits(twin_merged), rtol=0, atol=1e-6)
