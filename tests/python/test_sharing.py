"""The parameters and gradients Python sees are the engine's memory (DLPack, no copy)."""

import numpy as np
import pytest
import torch

from lema import LemaModel, _lema
from conftest import batches, tiny_config


def engine_adapter(model, tmp_path):
    """The adapter as the engine writes it (read back with lema's own reader)."""
    model.save_pretrained(tmp_path / "adapter")
    tensors, _ = _lema.load_safetensors(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    return {n: np.frombuffer(raw, dtype="<f4").reshape(shape) for n, dt, shape, raw in tensors}


def test_parameters_are_engine_memory(tiny_dir, device, tmp_path):
    with LemaModel(tiny_config(tiny_dir, device)) as model:
        model.initialize_lora()
        params = model.get_trainable_parameters()
        bufs = model._engine.buffers()
        assert len(params) == len(bufs) == 2 * 3 * 2  # A and B of 3 linears in 2 blocks
        for p, (name, shape, pbuf, gbuf) in zip(params, bufs):
            assert p.is_leaf and p.requires_grad and p.dtype == torch.float32
            assert tuple(p.shape) == shape
            assert p.data_ptr() == pbuf.address, name
            assert p.device.type == device
        # a write on the torch side is what the engine saves
        with torch.no_grad():
            params[1].fill_(0.25)  # a B matrix
        saved = engine_adapter(model, tmp_path)
        name = bufs[1][0]
        assert np.all(saved[name] == 0.25)
        # numpy views of the same buffers see it too
        assert np.all(np.from_dlpack(bufs[1][2]) == 0.25) if device == "cpu" else True


def test_gradients_are_engine_memory(tiny_dir, device):
    with LemaModel(tiny_config(tiny_dir, device)) as model:
        model.initialize_lora()
        params = model.get_trainable_parameters()
        seen = {}

        class Probe(torch.optim.SGD):
            """Checks, at the optimizer step, that each .grad is the engine's buffer."""

            def step(self, closure=None):
                for p, (_, _, _, gbuf) in zip(params, model._engine.buffers()):
                    assert p.grad is not None and p.grad.data_ptr() == gbuf.address
                seen["norm"] = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
                return super().step(closure)

        trainer = model.get_trainer(Probe(params, lr=0.0))
        trainer.train_step(batches(1)[0])
        assert seen["norm"] > 0
        assert seen["norm"] == pytest.approx(trainer.last_grad_norm, rel=1e-5)
        # zero_grad() (set_to_none) dropped .grad; the next step attaches the buffers again
        assert all(p.grad is None for p in params)
        trainer.train_step(batches(1, seed=1)[0])


def test_memory_outlives_close(tiny_dir, device):
    model = LemaModel(tiny_config(tiny_dir, device))
    model.initialize_lora()
    params = model.get_trainable_parameters()
    model.close()
    # the tensors keep the engine's memory alive: reading them is safe
    assert torch.isfinite(params[0]).all()
    with pytest.raises(RuntimeError, match="closed"):
        model.get_trainer(None)


def test_dlpack_protocol_details(tiny_dir, device):
    with LemaModel(tiny_config(tiny_dir, device)) as model:
        model.initialize_lora()
        _, _, pbuf, _ = model._engine.buffers()[0]
        assert pbuf.__dlpack_device__() == ((1, 0) if device == "cpu" else (2, 0))
        with pytest.raises(BufferError, match="does not copy"):
            pbuf.__dlpack__(copy=True)
        with pytest.raises(BufferError, match="not \\(3, 1\\)"):
            pbuf.__dlpack__(dl_device=(3, 1))
        # the versioned capsule (DLPack >= 1.0) and the legacy one
        assert "dltensor_versioned" in repr(pbuf.__dlpack__(max_version=(1, 0)))
        assert "dltensor" in repr(pbuf.__dlpack__())
