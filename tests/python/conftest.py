"""Fixtures of the Python package's tests: the device under test, a tiny random model and
the real SmolLM2-135M-Instruct (prepared from the GGUF that scripts/fetch-smollm2.sh
caches). A missing prerequisite skips, except under CI=true, where it fails (only a GPU
may be absent), as in the Rust tests (tests/common/skip.rs)."""

import os
import pathlib
import signal

import pytest

import lema
from lema import _lema

ROOT = pathlib.Path(__file__).resolve().parents[2]
GGUF = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CI = os.environ.get("CI", "").lower() in ("true", "1")

# A shell without job control starts a background command (`scripts/test &`) with SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C tests would
# test the launcher, not lema. Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def need(condition: bool, why: str) -> None:
    """Skip (fail under CI) unless `condition`."""
    if not condition:
        if CI:
            pytest.fail(f"{why} (under CI=true a missing prerequisite fails)")
        pytest.skip(why)


def device_under_test() -> str:
    """LEMA_TEST_DEVICE (default cpu); cuda skips without a usable GPU, even under CI."""
    dev = os.environ.get("LEMA_TEST_DEVICE", "cpu")
    if dev == "cuda":
        ok, why = _lema.cuda_status()
        if not ok:
            pytest.skip(f"no GPU: {why}")
    return dev


@pytest.fixture
def device() -> str:
    return device_under_test()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    """A 2-layer Llama-shaped random model (vocab 272, hidden 64) with a byte tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    _lema.write_random_model(str(d), "tiny", vocab=272, layers=2, dtype="f32", seed=11)
    return d


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> pathlib.Path:
    """SmolLM2-135M-Instruct, prepared by this build from the cached GGUF."""
    need(GGUF.is_file(), f"{GGUF} is absent (run scripts/fetch-smollm2.sh)")
    d = tmp_path_factory.mktemp("smollm2")
    from lema.utils.model_utils import prepare_monolithic_safetensors

    prepare_monolithic_safetensors(str(GGUF), str(d / "model.safetensors"), progress=False)
    return d


def tiny_config(tiny_dir, device, **kw) -> lema.LemaConfig:
    base = dict(model_name_or_path=str(tiny_dir), gbi_path=str(tiny_dir / "model.safetensors"),
                lora_rank=4, lora_target_modules=["q_proj", "v_proj", "down_proj"], device=device, seed=7)
    base.update(kw)
    return lema.LemaConfig(**base)


def batches(n: int, b: int = 2, t: int = 16, vocab: int = 272, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(b, t), dtype=np.int64) for _ in range(n)]


def pytest_runtest_logreport(report):
    """List every skip in scripts/test's summary (LEMA_TEST_SKIPS), as the Rust tests do."""
    path = os.environ.get("LEMA_TEST_SKIPS")
    if path and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"tests/python/{report.nodeid}: {reason}\n")
