"""Without torch, the engine's own AdamW trains and the parameters are numpy views."""

import subprocess
import sys
import textwrap


def test_without_torch(tiny_dir):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import numpy as np
        from lema import LemaConfig, LemaModel
        cfg = LemaConfig(gbi_path={str(tiny_dir / "model.safetensors")!r}, lora_rank=4, device="cpu")
        with LemaModel(cfg) as model:
            model.initialize_lora()
            params = model.get_trainable_parameters()
            assert all(isinstance(p, np.ndarray) for p in params), type(params[0])
            bufs = model._engine.buffers()
            assert params[0].ctypes.data == bufs[0][2].address
            trainer = model.get_trainer()
            ids = np.random.default_rng(0).integers(0, 272, size=(2, 16))
            losses = [trainer.train_step(ids)[1] for _ in range(5)]
            assert losses[-1] < losses[0], losses
            assert np.abs(params[1]).sum() > 0  # B moved, seen through the view
        print("ok", losses[0], losses[-1])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
