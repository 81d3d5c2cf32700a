"""A tiny Q8_0-quantized GGUF causal LM (Llama layout, GPT-2 style BPE tokenizer), written with ``gguf``.

The same kind of file as the demo's default (SmolLM2-135M-Instruct, Llama architecture, tied embeddings,
``tokenizer.ggml.model = "gpt2"``), but 2 layers of width 32 so that loading it takes a second. Used by
tests/test_gguf_loading.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_lm import make_tiny_model_dir


def _llama_permute(w, n_head: int):
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py); transformers undoes it when loading."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(path: Path) -> Path:
    """Write ``path`` (a .gguf file) from the tiny Llama of tiny_lm.py, its matrices quantized to Q8_0."""
    import gguf
    import numpy as np
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    src = make_tiny_model_dir(path.parent / (path.stem + "_hf"))
    tok = AutoTokenizer.from_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src)
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)

    def q8(name, arr):
        data = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", sd["model.embed_tokens.weight"])
    q8("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q8(f"blk.{i}.attn_q.weight", _llama_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        q8(f"blk.{i}.attn_k.weight", _llama_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        q8(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        q8(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        q8(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        q8(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        q8(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
