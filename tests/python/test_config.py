"""LemaConfig: the guide's keywords, clear errors for wrong ones, and a round trip."""

import pytest

from lema import LemaConfig, MemoryStrategy


def test_defaults_and_guide_keywords():
    c = LemaConfig(model_name_or_path="NousResearch/Llama-2-7b-hf", gbi_path="llama2_7b.safetensors",
                   lora_rank=16, gradient_checkpointing=True)
    assert c.strategy is MemoryStrategy.STREAMING
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout, c.device, c.seed) == (16, 32.0, 0.0, "auto", 42)
    assert c.lora_target_modules is None  # the architecture's PEFT default


def test_unknown_keyword_names_the_closest():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lora_rnak'; did you mean 'lora_rank'"):
        LemaConfig(gbi_path="m.safetensors", lora_rnak=8)
    with pytest.raises(TypeError, match="did you mean 'gradient_checkpointing'"):
        LemaConfig(gbi_path="m.safetensors", gradient_checkpoint=True)
    with pytest.raises(AttributeError, match="did you mean 'lora_alpha'"):
        LemaConfig(gbi_path="m.safetensors").lora_alpah = 3


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(lora_rank=0), ValueError, "lora_rank must be at least 1"),
    (dict(lora_rank=2.5), TypeError, "lora_rank must be an integer"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    (dict(strategy="fast"), ValueError, "strategy 'fast' is not one of STREAMING, RESIDENT, BUDGET"),
    (dict(device="tpu"), ValueError, "device must be 'auto', 'cuda' or 'cpu'"),
    (dict(dtype="int8"), ValueError, "dtype 'int8' is not supported"),
    (dict(lora_target_modules=[]), TypeError, "non-empty list"),
    (dict(gradient_checkpointing="yes"), TypeError, 'gradient_checkpointing must be True, False or "auto"'),
    (dict(gradient_checkpointing=1), TypeError, 'gradient_checkpointing must be True, False or "auto"'),
])
def test_bad_values(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        LemaConfig(gbi_path="m.safetensors", **kw)


def test_gradient_checkpointing_auto():
    c = LemaConfig(gbi_path="m.safetensors", gradient_checkpointing="AUTO")
    assert c.gradient_checkpointing == "auto"
    assert LemaConfig.from_dict(c.to_dict()) == c


def test_no_model_at_all():
    with pytest.raises(ValueError, match="give gbi_path"):
        LemaConfig()


def test_failed_assignment_keeps_the_old_value():
    c = LemaConfig(gbi_path="m.safetensors")
    with pytest.raises(ValueError):
        c.lora_rank = -1
    assert c.lora_rank == 16


def test_round_trip(tmp_path):
    c = LemaConfig(model_name_or_path="org/name", gbi_path="m.safetensors", lora_rank=8, lora_alpha=16,
                   lora_target_modules=["q_proj", "k_proj"], strategy=MemoryStrategy.BUDGET, max_vram_gb=2.5,
                   dtype="bfloat16", device="cpu", prefetch_distance=1, seed=3)
    d = c.to_dict()
    assert d["strategy"] == "budget" and d["dtype"] == "bfloat16"
    assert LemaConfig.from_dict(d) == c
    c.save_pretrained(tmp_path)
    back = LemaConfig.from_pretrained(tmp_path)
    assert back == c and back.strategy is MemoryStrategy.BUDGET
    assert LemaConfig.from_pretrained(tmp_path, lora_rank=4).lora_rank == 4
    with pytest.raises(FileNotFoundError, match="lema_config.json"):
        LemaConfig.from_pretrained(tmp_path / "nowhere")


def test_step_graphs_reach_the_engine_config():
    import json

    from lema.config import engine_config

    on = json.loads(engine_config(LemaConfig(gbi_path="m.safetensors"), "m.safetensors", None))
    assert on["step_graphs"] is True  # the default
    c = LemaConfig(gbi_path="m.safetensors", step_graphs=False)
    assert json.loads(engine_config(c, "m.safetensors", None))["step_graphs"] is False
    with pytest.raises(TypeError, match="step_graphs must be True or False"):
        LemaConfig(gbi_path="m.safetensors", step_graphs=1)


def test_seq_tile_reaches_the_engine_config():
    import json

    from lema.config import engine_config

    assert LemaConfig(gbi_path="m.safetensors").seq_tile is None  # chosen from free GPU memory
    c = LemaConfig(gbi_path="m.safetensors", seq_tile=4096)
    assert json.loads(engine_config(c, "m.safetensors", None))["seq_tile"] == 4096
    assert LemaConfig(gbi_path="m.safetensors", seq_tile=0).seq_tile == 0  # never tiled
    with pytest.raises(ValueError, match="seq_tile must be at least 0"):
        LemaConfig(gbi_path="m.safetensors", seq_tile=-1)
    with pytest.raises(TypeError, match="seq_tile must be an integer"):
        LemaConfig(gbi_path="m.safetensors", seq_tile=1.5)
