"""GGUF export (tuneforge/models/gguf_export.py), checked by a reader tuneforge did not write: transformers'
`from_pretrained(..., gguf_file=...)` for the model and its tokenizer, and the gguf package's GGUFReader for the
file's tensor types and the LoRA layout. The real model's round trip (SmolLM2, through the CLI) is in
tests/e2e/test_real_model.py."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import STORIES
from tuneforge.models import gguf_export as g
from tuneforge.models import ollama
from tuneforge.errors import UserError
from tuneforge.files import atomic_file

IDS = "Once upon a time there was a little girl named Lily. She liked to play."


def _export(model, tokenizer, out, quant, name="tiny"):
    return g.write_gguf(out, model.state_dict(), model.config.to_dict(), tokenizer, quant, name)


def _read_back(out):
    return AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()


def _types(out) -> dict:
    from gguf import GGUFReader
    return {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quant, tol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2)])
def test_round_trip_through_transformers(tiny_models, tmp_path, arch, quant, tol):
    """Each architecture family and quant type comes back as the same model: logits within the type's rounding,
    the same greedy continuation in f16. q/k rows come back in transformers' order only if they went out in
    llama.cpp's interleaved rotary layout (llama, mistral) or unpermuted (qwen2)."""
    src = tiny_models(arch)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path / f"tiny-{quant}.gguf"
    assert _export(model, tok, out, quant) == []  # hidden 64, ffn 128: every row is whole 32-blocks
    back = _read_back(out)
    assert type(back).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    ids = tok(IDS, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert (got - want).abs().max() < tol * want.abs().max()
    if quant == "f16":
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:, :6], **kw), back.generate(ids[:, :6], **kw))


def test_tensor_types_and_the_f16_fallback(tmp_path, tok):
    """stories260K's ffn_down rows (172 wide) are not whole 32-blocks: F16, and said; norms stay F32; with q4_0
    the token embedding is Q8_0."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    notes = _export(model, tok, tmp_path / "s.gguf", "q4_0")
    assert notes == [f"blk.{i}.ffn_down.weight: rows of 172 are not whole 32-blocks, written F16" for i in range(5)]
    types = _types(tmp_path / "s.gguf")
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied: the embedding is the head
    back = _read_back(tmp_path / "s.gguf")
    ids = tok(IDS, return_tensors="pt").input_ids
    with torch.no_grad():  # 4-bit weights of a 260K-parameter model: the logits follow, far from equal
        pair = torch.stack([back(ids).logits.flatten(), model(ids).logits.flatten()])
    assert torch.corrcoef(pair)[0, 1] > 0.97


def test_the_tokenizer_comes_back_with_the_same_ids(tmp_path, tok):
    """A sentencepiece-style vocabulary (stories260K): tokens, scores from the merge order, byte tokens, special
    ids and the add-bos flag, read back by transformers' GGUF tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    _export(model, tok, tmp_path / "s.gguf", "f16")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf")
    texts = [IDS, "Lily said: <s> hi </s> and 12345 apples!", "  two spaces, a tab\tand é ü 日本"]
    for text in texts:
        assert back(text).input_ids == tok(text).input_ids, text
    assert (back.bos_token_id, back.eos_token_id, back.unk_token_id) == (1, 2, 0)


def test_q_and_k_rows_interleave_as_transformers_undoes_them():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of 16 rows
    undo = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 8})
    assert np.array_equal(undo._reverse_permute_weights(g._interleave_rotary(w, 8), 8, 8), w)
    assert not np.array_equal(g._interleave_rotary(w, 8), w)


def test_gguf_lora_is_the_merged_update_in_the_base_files_layout(tiny_models, tmp_path):
    """The GGUF LoRA's tensors, applied as llama.cpp does (W + alpha / r * B @ A, on the base file's tensors), give
    the merged model's weights in the base file's layout, for every adapted projection."""
    from gguf import GGUFReader
    from peft import LoraConfig, get_peft_model

    src = tiny_models("llama")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    _export(base, tok, tmp_path / "base.gguf", "f32")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    layers = g.write_gguf_lora(tmp_path / "a.gguf", tmp_path / "adapter", base.config.to_dict(), "f32", "tiny")
    assert layers == 2 * 7
    merged = peft_model.merge_and_unload()
    _export(merged, tok, tmp_path / "merged.gguf", "f32")
    lora = GGUFReader(str(tmp_path / "a.gguf"))
    fields = {k: f.contents() for k, f in lora.fields.items() if k.startswith(("general.type", "adapter."))}
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    tensors = {t.name: np.array(t.data) for t in lora.tensors}
    base_t = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "base.gguf")).tensors}
    merged_t = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "merged.gguf")).tensors}
    adapted = sorted(n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a"))
    assert len(adapted) == 14 and "blk.0.attn_q.weight" in adapted and "blk.1.ffn_down.weight" in adapted
    for name in adapted:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert a.shape[0] == 4 and b.shape[1] == 4  # (r, in) and (out, r), as numpy reads GGUF's (in, r) / (r, out)
        applied = base_t[name] + 8 / 4 * b @ a
        np.testing.assert_allclose(applied, merged_t[name], atol=1e-5, err_msg=name)


def test_gguf_lora_refuses_what_a_gguf_lora_cannot_carry(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "use_dora": True}))
    with pytest.raises(UserError, match="gguf-lora takes a plain LoRA adapter \\(this is DoRA\\)"):
        g.write_gguf_lora(tmp_path / "a.gguf", tmp_path, {"model_type": "llama"}, "f16", "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "modules_to_save": ["lm_head"]}))
    with pytest.raises(UserError, match="also trains whole modules"):
        g.write_gguf_lora(tmp_path / "a.gguf", tmp_path, {"model_type": "llama"}, "f16", "x")
    assert not (tmp_path / "a.gguf").exists()


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_ollama_template_renders_a_conversation_as_the_chat_template_does(tok):
    """A ChatML template with a default system turn (as SmolLM2's): the TEMPLATE written for it renders a two-turn
    conversation as the tokenizer's own template does, and the default system prompt is found."""
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = CHATML
    name, template, stops, system = ollama.chat_format(tok)
    assert (name, stops, system) == ("chatml", ["<|im_start|>", "<|im_end|>"], "You are a helpful assistant.")
    two_turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    want = tok.apply_chat_template(two_turns, tokenize=False, add_generation_prompt=True)
    assert ollama.render_go_template(template, two_turns) == want
    text = ollama.modelfile_text("m.gguf", template, stops, system)
    assert text.splitlines()[0] == "FROM ./m.gguf" and 'PARAMETER stop "<|im_end|>"' in text
    assert f'TEMPLATE """{template}"""' in text and 'SYSTEM """You are a helpful assistant."""' in text


def test_a_chat_template_no_ollama_template_reproduces_is_refused(tok):
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="not one tuneforge writes an Ollama TEMPLATE for"):
        ollama.chat_format(tok)
    tok.chat_template = CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")  # no newline between turns
    with pytest.raises(UserError, match="chatml-like but renders differently"):
        ollama.chat_format(tok)
    with pytest.raises(ValueError, match="unsupported template action"):
        ollama.render_go_template("{{ if .System }}x{{ end }}", [])


def test_atomic_file_keeps_the_old_file_whole_when_writing_fails(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_llama3_rope_scaling_becomes_llama_cpps_rope_freqs(tmp_path, tok):
    """Llama 3.1's rope scaling: rope_freqs holds, per rotary frequency, base / scaled inverse frequency: 1 for the
    high frequencies, `factor` for the low ones (transformers' own rope initialisation computes both)."""
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=scaling)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    _export(model, tok, tmp_path / "l3.gguf", "f16")
    reader = GGUFReader(str(tmp_path / "l3.gguf"))
    factors = {t.name: np.array(t.data) for t in reader.tensors}["rope_freqs.weight"]
    assert factors.shape == (16,) and factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= -1e-6)  # from the high frequencies (kept) to the low ones (scaled)
    assert reader.fields["llama.rope.freq_base"].contents() == pytest.approx(500000.0)
