"""Host memory through the Python API: the frozen layers read from disk through the
staging ring (``weight_source="disk"``) train exactly as from the mapped file, and a
RESIDENT model that would exceed ``max_host_memory_gb`` is refused with a MemoryError
that has the numbers, before anything is allocated."""

import numpy as np
import pytest

from lema import LemaConfig, LemaModel, MemoryStrategy
from conftest import batches, tiny_config


def losses(config, data):
    with LemaModel(config) as m:
        m.initialize_lora()
        t = m.get_trainer(None, lr=1e-2)
        out = [t.train_step(ids)[1] for ids in data]
        params = [p.detach().cpu().numpy().copy() if hasattr(p, "detach") else np.array(p, copy=True)
                  for p in m.get_trainable_parameters()]
    return out, params


def test_disk_source_equals_the_mapped_file(tiny_dir, device):
    data = batches(3)
    la, pa = losses(tiny_config(tiny_dir, device, weight_source="mapped"), data)
    lb, pb = losses(tiny_config(tiny_dir, device, weight_source="disk"), data)
    assert la == lb
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x, y)


def test_resident_over_the_host_budget_is_a_memory_error(tiny_dir, device):
    # 10 MB is less than this Python process holds already: nothing more may be pinned
    cfg = tiny_config(tiny_dir, device, strategy=MemoryStrategy.RESIDENT, max_host_memory_gb=0.01)
    with pytest.raises(MemoryError, match=r"needs .* of host memory.*max_host_memory"):
        LemaModel(cfg).initialize_lora()


def test_bad_host_settings_are_named():
    with pytest.raises(ValueError, match="weight_source must be 'auto', 'mapped' or 'disk'"):
        LemaConfig(model_name_or_path="x", weight_source="ssd")
    with pytest.raises(ValueError, match="max_host_memory_gb must be positive"):
        LemaConfig(model_name_or_path="x", max_host_memory_gb=0)
