"""A saved adapter is checked against the base model's structure (no weights): every method fits the model it was
trained on, and a model of another size or layout gives one UserError naming the adapter file."""
import pytest
from transformers import LlamaConfig

from tests.conftest import STORIES
from tuneforge.config.schema import ModelConfig, PeftConfig
from tuneforge.errors import UserError
from tuneforge.models.load import load_model
from tuneforge.peft import apply_peft, save_adapters
from tuneforge.peft.fit import check_adapters_fit

METHODS = [["lora"], ["ia3"], ["prompt_tuning"], ["p_tuning"], ["prefix_tuning"], ["llama_adapter"], ["adapter"],
           ["lora", "prompt_tuning"], ["lora", "adapter"]]


@pytest.mark.parametrize("methods", METHODS, ids=["+".join(m) for m in METHODS])
def test_adapter_fits_its_own_base_and_not_another(methods, tmp_path):
    parts = [PeftConfig(method=m, lora_rank=4) if m == "lora" else PeftConfig(method=m) for m in methods]
    model = apply_peft(load_model(ModelConfig(name_or_path=str(STORIES))), parts if len(parts) > 1 else parts[0])
    save_adapters(model, tmp_path / "final", str(STORIES))
    check_adapters_fit(ModelConfig(name_or_path=str(STORIES)), tmp_path / "final")
    # another base: a config alone (the check never reads weights), half stories260K's width
    other = str(tmp_path / "narrow")
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(other)
    with pytest.raises(UserError) as err:
        check_adapters_fit(ModelConfig(name_or_path=other), tmp_path / "final")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "final")) and f"the base model '{other}'" in message
    assert "\n" not in message
