"""Training through the Python API: torch's AdamW on the shared parameters equals the
engine's AdamW, accumulation equals one big batch, and checkpoints resume exactly."""

import json
import os

import numpy as np
import pytest
import torch

from lema import LemaModel
from conftest import batches, tiny_config

STEPS = 4


def run(model, trainer, data):
    losses = [trainer.train_step(ids)[1] for ids in data]
    params = [p.detach().cpu().numpy().copy() if hasattr(p, "detach") else np.array(p, copy=True)
              for p in model.get_trainable_parameters()]
    return losses, params


def test_torch_adamw_equals_engine_adamw(tiny_dir, device):
    data = batches(STEPS)
    with LemaModel(tiny_config(tiny_dir, device)) as a, LemaModel(tiny_config(tiny_dir, device)) as b:
        a.initialize_lora()
        b.initialize_lora()
        opt = torch.optim.AdamW(a.get_trainable_parameters(), lr=1e-2, weight_decay=0.01)
        la, pa = run(a, a.get_trainer(opt), data)
        lb, pb = run(b, b.get_trainer(None, lr=1e-2, weight_decay=0.01), data)
    assert la[0] == lb[0]  # same initialisation, same first forward
    np.testing.assert_allclose(la, lb, rtol=2e-5)
    assert la[-1] < la[0]
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


def test_torch_sgd_equals_engine_sgd(tiny_dir, device):
    data = batches(STEPS)
    with LemaModel(tiny_config(tiny_dir, device)) as a, LemaModel(tiny_config(tiny_dir, device)) as b:
        a.initialize_lora()
        b.initialize_lora()
        opt = torch.optim.SGD(a.get_trainable_parameters(), lr=0.5, momentum=0.9)
        la, pa = run(a, a.get_trainer(opt, max_grad_norm=0.5), data)
        lb, pb = run(b, b.get_trainer(None, engine_optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.0,
                                      max_grad_norm=0.5), data)
    np.testing.assert_allclose(la, lb, rtol=2e-5)
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


def test_accumulation_equals_one_big_batch(tiny_dir, device):
    # two micro-batches with different counted tokens (labels -100 in one) against one batch
    ids = batches(1, b=4, t=12)[0]
    labels = ids.copy()
    labels[2:, :7] = -100
    with LemaModel(tiny_config(tiny_dir, device)) as a, LemaModel(tiny_config(tiny_dir, device)) as b:
        a.initialize_lora()
        b.initialize_lora()
        pa, pb = a.get_trainable_parameters(), b.get_trainable_parameters()
        ga, gb = {}, {}

        def grads_at_step(params, store):
            class Probe(torch.optim.SGD):
                def step(self, closure=None):
                    store["g"] = [p.grad.detach().cpu().clone() for p in params]
                    return super().step(closure)
            return Probe(params, lr=0.1)

        ta = a.get_trainer(grads_at_step(pa, ga), gradient_accumulation_steps=2)
        ta.train_step(ids[:2], labels=labels[:2])
        assert ta.global_step == 0 and ga == {}
        ta.train_step(ids[2:], labels=labels[2:])
        assert ta.global_step == 1
        tb = b.get_trainer(grads_at_step(pb, gb))
        tb.train_step(ids, labels=labels)
    for x, y in zip(ga["g"], gb["g"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("external", [True, False], ids=["torch-adamw", "engine-adamw"])
def test_checkpoint_resumes_exactly(tiny_dir, device, tmp_path, external):
    data = batches(STEPS)

    def trainer_for(model):
        model.initialize_lora()
        if external:
            opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return model.get_trainer(opt, lr_scheduler=sched, max_grad_norm=1.0)
        return model.get_trainer(None, lr=1e-2, max_grad_norm=1.0)

    with LemaModel(tiny_config(tiny_dir, device)) as m:
        straight = run(m, trainer_for(m), data)
    ck = tmp_path / "checkpoint-2"
    with LemaModel(tiny_config(tiny_dir, device)) as m:
        t = trainer_for(m)
        run(m, t, data[:2])
        t.save_checkpoint(ck)
    names = sorted(os.listdir(ck))
    assert "adapter_model.safetensors" in names and "trainer_state.json" in names
    assert ("torch_optimizer.safetensors" in names) == external
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folders left"
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names), "no pickle"
    with LemaModel(tiny_config(tiny_dir, device, seed=99)) as m:  # another init: the load must overwrite it
        t = trainer_for(m)
        t.load_checkpoint(ck)
        assert t.global_step == 2
        resumed = run(m, t, data[2:])
    assert resumed[0] == straight[0][2:]
    for x, y in zip(resumed[1], straight[1]):
        np.testing.assert_array_equal(x, y)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 2 and (state["optimizer"] is None) == external


def test_checkpoint_mismatches_are_refused(tiny_dir, device, tmp_path):
    with LemaModel(tiny_config(tiny_dir, device)) as m:
        m.initialize_lora()
        t = m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-3), gradient_accumulation_steps=2)
        t.train_step(batches(1)[0])
        with pytest.raises(ValueError, match="middle of an accumulated step"):
            t.save_checkpoint(tmp_path / "ck")
        t.train_step(batches(1)[0])
        t.save_checkpoint(tmp_path / "ck")
    with LemaModel(tiny_config(tiny_dir, device)) as m:
        m.initialize_lora()
        with pytest.raises(ValueError, match="saved with a torch optimizer"):
            m.get_trainer(None).load_checkpoint(tmp_path / "ck")
    with LemaModel(tiny_config(tiny_dir, device, lora_rank=8)) as m:
        m.initialize_lora()
        t = m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-3))
        with pytest.raises(ValueError, match="differs from this model's"):
            t.load_checkpoint(tmp_path / "ck")


def test_evaluate(tiny_dir, device):
    with LemaModel(tiny_config(tiny_dir, device)) as m:
        m.initialize_lora()
        t = m.get_trainer(None)
        data = batches(2)
        out = t.evaluate([{"input_ids": d} for d in data])
        assert out["tokens"] == 2 * 2 * 15
        # the mean over both batches' tokens, as the loss of train_step reports per batch
        per = [t.evaluate([d])["loss"] for d in data]
        assert out["loss"] == pytest.approx(sum(per) / 2, rel=1e-6)
        assert out["perplexity"] == pytest.approx(np.exp(out["loss"]))
        logits, loss = t.train_step(data[0], return_logits=True)
        assert loss == pytest.approx(per[0], rel=1e-5)
        assert tuple(logits.shape) == (2, 16, 272)
