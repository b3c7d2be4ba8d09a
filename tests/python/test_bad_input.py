"""Wrong inputs raise TypeError/ValueError/FileNotFoundError with the reason; Ctrl-C
raises KeyboardInterrupt with the parameters unchanged; nothing aborts the interpreter."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from lema import LemaConfig, LemaModel
from conftest import batches, tiny_config


@pytest.fixture
def trainer(tiny_dir, device):
    model = LemaModel(tiny_config(tiny_dir, device))
    model.initialize_lora()
    t = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    yield t
    model.close()


@pytest.mark.parametrize("ids, labels, exc, msg", [
    (torch.rand(2, 8), None, TypeError, "input_ids must hold integer token ids, got a tensor of torch.float32"),
    (np.zeros((2, 8)), None, TypeError, "integer token ids, got values of type float64"),
    ([[1.5, 2.0]], None, TypeError, "integer token ids"),
    ("hello", None, TypeError, "must be token ids"),
    (torch.zeros(2, 3, 4, dtype=torch.long), None, ValueError, r"1-D \[seq\] or 2-D \[batch, seq\], got shape \(2, 3, 4\)"),
    ([[1, 2, 3], [4, 5]], None, ValueError, "rows of different lengths"),
    (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long), ValueError,
     r"labels have shape \(2, 7\), input_ids \(2, 8\)"),
    (torch.zeros(0, 8, dtype=torch.long), None, ValueError, "empty"),
    ([[1, -3, 4]], None, ValueError, "input_ids hold -3, which is not a token id"),
    # the engine's own checks, with its message
    ([[1, 2, 999]], None, ValueError, "token id 999 is outside the vocabulary of 272 ids"),
    ([[1, 2, 3]], [[1, -5, 3]], ValueError, "label -5 is negative"),
    ([[1, 2, 3]], [[-100, -100, -100]], ValueError, "no counted tokens"),
])
def test_bad_batches(trainer, ids, labels, exc, msg):
    before = [p.detach().clone() for p in trainer.model.get_trainable_parameters()]
    with pytest.raises(exc, match=msg):
        trainer.train_step(ids, labels=labels)
    for p, q in zip(trainer.model.get_trainable_parameters(), before):
        assert torch.equal(p.detach(), q)
    trainer.train_step(batches(1)[0])  # still usable


def test_left_padding_is_refused(trainer):
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="left padding"):
        trainer.train_step(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    trainer.train_step(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))


def test_ids_on_another_gpu(trainer):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    with pytest.raises(ValueError, match="is on cuda:1, but the model is on cuda:0"):
        trainer.train_step(torch.zeros(1, 4, dtype=torch.long, device="cuda:1"))


def test_missing_files(tiny_dir, device, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.safetensors: no such file"):
        LemaModel(tiny_config(tiny_dir, device, gbi_path=str(tmp_path / "no_such.safetensors")))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        LemaModel(tiny_config(tiny_dir, device, gbi_path=str(tmp_path / "bad.safetensors")))
    with pytest.raises(FileNotFoundError):
        LemaModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="takes a LemaConfig"):
        LemaModel({"gbi_path": "x"})


def test_untrained_model_and_foreign_optimizer(tiny_dir, device):
    with LemaModel(tiny_config(tiny_dir, device)) as m:
        with pytest.raises(ValueError, match="initialize_lora"):
            m.get_trainable_parameters()
        m.initialize_lora()
        with pytest.raises(ValueError, match="not this model's"):
            m.get_trainer(torch.optim.AdamW([torch.zeros(3, requires_grad=True)]))
        with pytest.raises(TypeError, match="torch optimizer"):
            m.get_trainer("adamw")


def test_ctrl_c_during_train_step(tiny_dir, device):
    # a step long enough (many tokens through a 2-layer model) to be interrupted mid-way
    cfg = tiny_config(tiny_dir, device, gradient_checkpointing=True)
    with LemaModel(cfg) as m:
        m.initialize_lora()
        params = m.get_trainable_parameters()
        t = m.get_trainer(torch.optim.AdamW(params, lr=1e-2))
        t.train_step(batches(1)[0])  # warm: B is no longer zero
        before = [p.detach().clone() for p in params]
        big = batches(1, b=64, t=512)[0]
        t0 = time.time()
        t.train_step(big)
        step_time = time.time() - t0
        before = [p.detach().clone() for p in params]
        timer = threading.Timer(min(0.3, step_time / 3), lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        start = time.time()
        with pytest.raises(KeyboardInterrupt):
            t.train_step(big)
        assert time.time() - start < step_time, "the step was not stopped early"
        for p, q in zip(params, before):
            assert torch.equal(p.detach(), q), "parameters changed by an interrupted step"
        _, loss = t.train_step(batches(1)[0])  # usable afterwards
        assert np.isfinite(loss)


def test_gpt2_dropouts_the_engine_does_not_apply_are_a_warning(tmp_path):
    import json
    import pathlib
    import shutil

    src = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "gpt2"
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["resid_pdrop"] = 0.1  # as in every GPT-2 on the Hub
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"dropout \(resid_pdrop = 0.1\) is not applied"):
        model = LemaModel(LemaConfig(model_name_or_path=str(tmp_path),
                                     gbi_path=str(tmp_path / "model.safetensors"), device="cpu"))
    model.close()
