"""Tiny models built from configs (never the Hub), and small QPA configs for them."""

import torch

import peft_qpa



def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


MODEL_FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def small_config(arch: str, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], chunk_size=32, qnn_depth=2,
                  mapping_hidden_sizes=[16, 16], seed=0)
    kwargs.update(overrides)
    return peft_qpa.QPAConfig(**kwargs)


def train_steps(model, input_ids, steps=8, lr=1e-2):
    """A few AdamW steps on one batch (language-model loss); returns the losses and leaves the model in eval."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
