"""GGUF files for tests, written with the gguf package from the shipped stories260K model: F32 tensors (so reading
them back is exact), its BPE vocabulary and merges as a llama-style tokenizer, and the q/k row order llama.cpp uses
for rotary heads (the reader undoes it)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import STORIES

_LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def _rotary_rows(weight, heads: int):
    """llama.cpp stores each head's rotary pairs interleaved; transformers keeps the two halves apart."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_stories_gguf(out: Path, arch: str = "llama", name: str = "tiny-stories") -> Path:
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((STORIES / "config.json").read_text())
    tok = json.loads((STORIES / "tokenizer.json").read_text())["model"]
    tokens = sorted(tok["vocab"], key=tok["vocab"].get)
    writer = gguf.GGUFWriter(str(out), arch=arch)
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if t in ("<s>", "</s>") else
                            gguf.TokenType.UNKNOWN if t == "<unk>" else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    for key, tensor in load_file(STORIES / "model.safetensors").items():
        weight = tensor.float().numpy()
        if key == "lm_head.weight":  # tied to the embeddings: a GGUF without output.weight says so
            continue
        if key == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", weight)
        elif key == "model.norm.weight":
            writer.add_tensor("output_norm.weight", weight)
        else:
            layer, sub = key.split(".")[2], ".".join(key.split(".")[3:-1])
            if sub in heads:
                weight = _rotary_rows(weight, heads[sub])
            writer.add_tensor(f"blk.{layer}.{_LAYER_TENSORS[sub]}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
