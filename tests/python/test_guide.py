"""The user guide's examples, as written, on SmolLM2-135M-Instruct (a small dataloader
stands in for the guide's), and the adapter it saves loads in PEFT with the same logits."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GGUF


def test_guide_examples_verbatim(smollm2_dir, tmp_path, device, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # §1 (the GGUF stands in for the Hub id; tests/python/test_hub.py downloads one)
    from lema.utils.model_utils import prepare_monolithic_safetensors

    prepare_monolithic_safetensors(
        str(GGUF),
        "smollm2.safetensors",
        device="auto",
    )
    # a small dataloader: the same short text, tokenized by the model's tokenizer
    from lema import _lema

    tok = _lema.Tokenizer(str(tmp_path))
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is Rome.")])
    dataloader = [{"input_ids": ids, "labels": ids}] * 6

    # §2, verbatim but for the paths and the device
    from lema import LemaConfig, LemaModel, LemaTrainer

    config = LemaConfig(
        model_name_or_path=str(tmp_path),
        gbi_path="smollm2.safetensors",
        lora_rank=16,
        gradient_checkpointing=True,
        device=device,
    )
    model = LemaModel(config)
    model.initialize_lora()  # Crucial for new models
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
    trainer = model.get_trainer(optimizer)
    assert isinstance(trainer, LemaTrainer)
    losses = []
    for batch in dataloader:
        logits, loss = trainer.train_step(batch['input_ids'], labels=batch['labels'])
        print(f"Loss: {loss}")
        losses.append(loss)
    trainer.save_checkpoint("checkpoints/lema-llama-7b-v1")

    # at the guide's lr of 1e-4 the loss on a repeated text falls at every step
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    assert sorted(os.listdir("checkpoints/lema-llama-7b-v1")) == [
        "adapter_config.json", "adapter_model.safetensors", "lema_config.json",
        "torch_optimizer.json", "torch_optimizer.safetensors", "trainer_state.json"]
    # generation with the adapter, and our logits for the PEFT comparison below
    assert isinstance(model.generate("The capital of France is", max_new_tokens=4), str)
    ours = trainer.evaluate([{"input_ids": ids}])["loss"]
    model.close()

    # the adapter loads in PEFT on the HF model of the same file, with the same loss
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    os.rename("smollm2.safetensors", "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, "checkpoints/lema-llama-7b-v1").eval()
    with torch.no_grad():
        theirs = float(peft_model(input_ids=ids, labels=ids).loss)
    tol = 2e-3 if device == "cpu" else 2e-2
    assert ours == pytest.approx(theirs, rel=tol), (ours, theirs)
    cfg = json.loads(open("checkpoints/lema-llama-7b-v1/adapter_config.json").read())
    assert cfg["r"] == 16 and cfg["peft_type"] == "LORA"


def test_reload_with_from_pretrained(smollm2_dir, tmp_path, device):
    from lema import LemaConfig, LemaModel

    cfg = LemaConfig(gbi_path=str(smollm2_dir / "model.safetensors"), lora_rank=8, device=device)
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    with LemaModel(cfg) as m:
        m.initialize_lora()
        t = m.get_trainer(None, lr=1e-2)
        for _ in range(2):
            t.train_step(ids)
        before = t.evaluate([ids])["loss"]
        m.save_pretrained(tmp_path / "adapter")
    with LemaModel.from_pretrained(tmp_path / "adapter", device=device) as m2:
        assert m2.config.lora_rank == 8
        after = m2.get_trainer(None).evaluate([ids])["loss"]
    assert after == pytest.approx(before, rel=1e-6)
