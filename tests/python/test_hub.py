"""Models from a (mock) Hugging Face Hub through the Python API: the guide's
prepare_monolithic_safetensors with a Hub id, the standard cache layout, a download
resumed after the server dropped the connection, and the refusals (401, 404, a wrong
checksum) as Python exceptions that name the file and leave the cache consistent."""

import hashlib
import os

import pytest

from lema import LemaConfig, LemaModel
from lema.utils.model_utils import prepare_monolithic_safetensors
from mock_hub import MockHub

REPO = "org/tiny"


@pytest.fixture
def hub(tiny_dir, tmp_path, monkeypatch):
    h = MockHub()
    h.add_folder(REPO, str(tiny_dir))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for v in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "LEMA_CACHE"):
        monkeypatch.delenv(v, raising=False)
    with h as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        yield h


def repo_dir(tmp_path):
    return tmp_path / "hf" / "hub" / "models--org--tiny"


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_prepare_from_the_hub_then_train(hub, tiny_dir, tmp_path, device):
    out = tmp_path / "out" / "tiny.safetensors"
    prepare_monolithic_safetensors(REPO, str(out), progress=False)
    root = repo_dir(tmp_path)
    assert sorted(os.listdir(root)) == ["blobs", "refs", "snapshots"]
    (commit,) = os.listdir(root / "snapshots")
    assert (root / "refs" / "main").read_text().strip() == commit
    link = root / "snapshots" / commit / "model.safetensors"
    assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
    assert sha256(link) == sha256(tiny_dir / "model.safetensors")
    assert not [n for n in os.listdir(root / "blobs") if n.endswith(".incomplete")]
    # the guide's configuration with a Hub id: the config beside the prepared file serves,
    # so building the model asks the Hub nothing
    before = len(hub.requests)
    cfg = LemaConfig(model_name_or_path=REPO, gbi_path=str(out), lora_rank=4, device=device)
    with LemaModel(cfg) as m:
        m.initialize_lora()
        _, loss = m.get_trainer(None).train_step([[1, 2, 3, 4, 5, 6]])
    assert loss > 0 and len(hub.requests) == before


def test_config_from_the_hub_when_not_beside_the_weights(hub, tiny_dir, tmp_path, device):
    import shutil

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", lone / "weights.safetensors")
    cfg = LemaConfig(model_name_or_path=REPO, gbi_path=str(lone / "weights.safetensors"), device=device)
    with LemaModel(cfg) as m:
        assert m.generate([1, 2, 3], max_new_tokens=2) is not None
    fetched = [r["path"] for r in hub.requests if r["method"] == "GET"]
    assert any(p.endswith("/config.json") for p in fetched)
    assert not any("model.safetensors" in p or "/cdn/" in p for p in fetched), "weights were downloaded"


def test_dropped_download_resumes(hub, tmp_path):
    out = tmp_path / "out.safetensors"
    hub.drop_after("model.safetensors", 40_000)
    with pytest.raises(ConnectionError, match=r"model.safetensors.*stopped at 40000 of .* bytes.*resume"):
        prepare_monolithic_safetensors(REPO, str(out), progress=False)
    parts = [n for n in os.listdir(repo_dir(tmp_path) / "blobs") if n.endswith(".incomplete")]
    assert len(parts) == 1 and os.path.getsize(repo_dir(tmp_path) / "blobs" / parts[0]) == 40_000
    assert not (repo_dir(tmp_path) / "refs" / "main").exists(), "a ref to a partial snapshot"
    prepare_monolithic_safetensors(REPO, str(out), progress=False)
    ranges = [r["range"] for r in hub.requests if r["range"]]
    assert "bytes=40000-" in ranges, ranges
    assert out.is_file()


def test_gated_repository(hub, tmp_path, monkeypatch):
    hub.gate(REPO, "s3cret")
    with pytest.raises(PermissionError, match=r"org/tiny.*gated.*HF_TOKEN"):
        prepare_monolithic_safetensors(REPO, str(tmp_path / "o.safetensors"), progress=False)
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    prepare_monolithic_safetensors(REPO, str(tmp_path / "o.safetensors"), progress=False)


def test_unknown_repository_and_bad_ids(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="org/nothing"):
        prepare_monolithic_safetensors("org/nothing", str(tmp_path / "o.safetensors"), progress=False)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        prepare_monolithic_safetensors("no-such-folder", str(tmp_path / "o.safetensors"), progress=False)


def test_wrong_checksum_leaves_no_link(hub, tmp_path):
    hub.corrupt_once("model.safetensors")
    with pytest.raises(OSError, match=r"model.safetensors.*checksum"):
        prepare_monolithic_safetensors(REPO, str(tmp_path / "o.safetensors"), progress=False)
    root = repo_dir(tmp_path)
    for snap in os.listdir(root / "snapshots"):
        assert not (root / "snapshots" / snap / "model.safetensors").exists()
    assert not [n for n in os.listdir(root / "blobs") if n.endswith(".incomplete")]
    prepare_monolithic_safetensors(REPO, str(tmp_path / "o.safetensors"), progress=False)


def test_offline_from_a_warm_cache(hub, tmp_path, monkeypatch):
    prepare_monolithic_safetensors(REPO, str(tmp_path / "a.safetensors"), progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    prepare_monolithic_safetensors(REPO, str(tmp_path / "b.safetensors"), progress=False)
    assert len(hub.requests) == n
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        prepare_monolithic_safetensors("org/other", str(tmp_path / "c.safetensors"), progress=False)


def test_ctrl_c_stops_a_download_and_the_next_call_resumes(hub, tmp_path, tiny_dir):
    import signal
    import threading
    import time

    size = os.path.getsize(tiny_dir / "model.safetensors")
    pieces = -(-size // (1 << 16))
    assert pieces >= 4, "the model is too small to interrupt mid-download"
    hub.throttle_once("model.safetensors", 20.0 / pieces)  # the whole file would take 20 s
    out = tmp_path / "o.safetensors"
    timer = threading.Timer(20.0 / pieces * 1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        prepare_monolithic_safetensors(REPO, str(out), progress=False)
    assert time.time() - start < 10, "the download was not stopped early"
    blobs = repo_dir(tmp_path) / "blobs"
    (part,) = [n for n in os.listdir(blobs) if n.endswith(".incomplete")]
    kept = os.path.getsize(blobs / part)
    assert 0 < kept < size
    prepare_monolithic_safetensors(REPO, str(out), progress=False)
    assert f"bytes={kept}-" in [r["range"] for r in hub.requests if r["range"]]
    assert out.is_file()
