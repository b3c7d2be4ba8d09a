"""The mock Hub itself, checked with urllib only (pytest, or `python test_mock_hub.py`)."""

import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mock_hub import MockHub, git_sha1_hex, sha256_hex  # noqa: E402

WEIGHTS = bytes(range(256)) * 40
CONFIG = b'{"model_type": "llama"}\n'


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url, method="GET", headers=None, follow=True):
    """(status, headers, body) of a request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    opener = urllib.request.build_opener(*([] if follow else [NoRedirect()]))
    try:
        with opener.open(req) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def make_hub():
    hub = MockHub()
    with tempfile.TemporaryDirectory() as d:
        for name, data in [("config.json", CONFIG), ("model.safetensors", WEIGHTS)]:
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        commit = hub.add_folder("org/tiny", d)
    return hub, commit


def test_listing_and_headers_of_small_and_lfs_files():
    hub, commit = make_hub()
    with hub as url:
        status, _, body = fetch(url + "/api/models/org/tiny/revision/main")
        assert status == 200
        listing = json.loads(body)
        assert listing["sha"] == commit
        assert sorted(s["rfilename"] for s in listing["siblings"]) == [
            "config.json",
            "model.safetensors",
        ]
        status, h, _ = fetch(url + "/org/tiny/resolve/main/config.json", "HEAD")
        assert status == 200
        assert h["ETag"] == '"%s"' % git_sha1_hex(CONFIG)
        assert h["X-Repo-Commit"] == commit
        assert int(h["Content-Length"]) == len(CONFIG)
        status, h, _ = fetch(url + "/org/tiny/resolve/main/model.safetensors", "HEAD", follow=False)
        assert status == 302
        assert h["X-Linked-Etag"] == '"%s"' % sha256_hex(WEIGHTS)
        assert int(h["X-Linked-Size"]) == len(WEIGHTS)
        assert h["Location"] == "%s/cdn/%s" % (hub.cdn_url, sha256_hex(WEIGHTS))
        assert hub.cdn_url != url
        status, _, body = fetch(url + "/org/tiny/resolve/%s/model.safetensors" % commit)
        assert status == 200 and body == WEIGHTS
    assert [r["method"] for r in hub.requests][:3] == ["GET", "HEAD", "HEAD"]
    assert [r["cdn"] for r in hub.requests][-2:] == [False, True], "the redirect went to the CDN"


def test_range_requests_and_a_dropped_connection():
    hub, _ = make_hub()
    cdn = "/cdn/" + sha256_hex(WEIGHTS)
    hub.drop_after("model.safetensors", 1000)
    with hub as url:
        req = urllib.request.urlopen(url + cdn)
        try:
            req.read()
            raise AssertionError("the connection was not dropped")
        except http.client.IncompleteRead as e:
            assert len(e.partial) == 1000
        status, h, body = fetch(url + cdn, headers={"Range": "bytes=1000-"})
        assert status == 206
        assert h["Content-Range"] == "bytes 1000-%d/%d" % (len(WEIGHTS) - 1, len(WEIGHTS))
        assert body == WEIGHTS[1000:]
        status, _, _ = fetch(url + cdn, headers={"Range": "bytes=%d-" % len(WEIGHTS)})
        assert status == 416
    assert hub.requests[1]["range"] == "bytes=1000-"


def test_gated_missing_and_corrupt():
    hub, _ = make_hub()
    hub.gate("org/tiny", "hf_secret")
    hub.corrupt_once("model.safetensors")
    with hub as url:
        status, h, _ = fetch(url + "/api/models/org/tiny/revision/main")
        assert status == 401 and h["X-Error-Code"] == "GatedRepo"
        auth = {"Authorization": "Bearer hf_secret"}
        assert fetch(url + "/api/models/org/tiny/revision/main", headers=auth)[0] == 200
        status, h, _ = fetch(url + "/api/models/org/absent/revision/main")
        assert status == 404 and h["X-Error-Code"] == "RepoNotFound"
        status, h, _ = fetch(url + "/api/models/org/tiny/revision/v9", headers=auth)
        assert status == 404 and h["X-Error-Code"] == "RevisionNotFound"
        status, h, _ = fetch(url + "/org/tiny/resolve/main/nope.json", "HEAD", auth)
        assert status == 404 and h["X-Error-Code"] == "EntryNotFound"
        weights = url + "/org/tiny/resolve/main/model.safetensors"
        first = fetch(weights, headers=auth)[2]
        assert len(first) == len(WEIGHTS) and sha256_hex(first) != sha256_hex(WEIGHTS)
        assert fetch(weights, headers=auth)[2] == WEIGHTS
    assert hub.requests[1]["authorization"] == "Bearer hf_secret"


def test_revisions():
    hub, main = make_hub()
    v1 = hub.add_files("org/tiny", {"config.json": b"{}"}, revision="v1.0")
    assert v1 != main
    with hub as url:
        listing = json.loads(fetch(url + "/api/models/org/tiny/revision/v1.0")[2])
        assert listing["sha"] == v1
        assert fetch(url + "/org/tiny/resolve/%s/config.json" % v1)[2] == b"{}"
        assert fetch(url + "/org/tiny/resolve/%s/config.json" % main)[2] == CONFIG


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            print("ok", name)
