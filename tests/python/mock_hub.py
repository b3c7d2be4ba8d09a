"""A mock Hugging Face Hub on 127.0.0.1 for the Python tests (standard library only).

It serves what lema asks of the real Hub, with the real Hub's headers, like the Rust
tests' tests/common/mock_hub.rs:

* ``GET /api/models/{org}/{name}/revision/{rev}``: ``sha`` and ``siblings[].rfilename``;
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{file}``: a small file directly (``ETag``: its
  git blob sha1), an LFS file (``.safetensors``, ``.bin``) as a 302 to ``/cdn/{sha256}``
  with ``X-Linked-Etag`` and ``X-Linked-Size``; ``X-Repo-Commit`` on both;
* ``GET /cdn/{sha256}`` on a second port (another origin, as the real CDN is), a
  ``Range: bytes=N-`` answered by a 206;

and misbehaves on demand: a gated repository (401 ``GatedRepo`` without the right
token), unknown repositories, revisions and files (404 with ``X-Error-Code``), a
download cut after N bytes (once), wrong bytes for a file (once).

Use::

    hub = MockHub()
    hub.add_folder("org/tiny", "path/to/hf/folder")
    with hub as endpoint:           # the server runs inside the block
        os.environ["HF_ENDPOINT"] = endpoint
        ...
    hub.requests     # every request seen: method, path, range, authorization, cdn (its port)
"""

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin")


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def git_sha1_hex(data):
    """git's blob id: what the Hub gives as the ETag of a file kept in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class MockHub:
    def __init__(self):
        self.repos = {}  # repo -> {"commits": {commit: {file: bytes}}, "refs": {}, "gated": token}
        self.blobs = {}  # sha256 -> (file, bytes)
        self.drops = {}  # file -> bytes sent before the connection is dropped (once)
        self.corrupt = set()  # files sent with a wrong byte (once)
        self.throttled = {}  # file -> seconds between 64 KiB pieces (once)
        self.requests = []
        self.url = None
        self.cdn_url = None
        self._lock = threading.Lock()
        self._servers = []

    # -- repositories ------------------------------------------------------------------

    def add_files(self, repo, files, revision="main"):
        """A commit of ``repo`` holding ``files`` ({name: bytes}), named by ``revision``
        (a branch or tag); returns its 40-hex commit id."""
        h = hashlib.sha1(repo.encode() + b"\0" + revision.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        commit = h.hexdigest()
        with self._lock:
            r = self.repos.setdefault(repo, {"commits": {}, "refs": {}, "gated": None})
            r["commits"][commit] = dict(files)
            r["refs"][revision] = commit
            for name, data in files.items():
                self.blobs[sha256_hex(data)] = (name, data)
        return commit

    def add_folder(self, repo, folder, revision="main"):
        """Every file under ``folder`` (links followed), as a commit of ``repo``."""
        files = {}
        for root, _, names in os.walk(folder, followlinks=True):
            for n in names:
                path = os.path.join(root, n)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                with open(path, "rb") as f:
                    files[rel] = f.read()
        return self.add_files(repo, files, revision)

    def gate(self, repo, token):
        """Answer 401 (GatedRepo) unless a request carries ``Bearer <token>``."""
        self.repos[repo]["gated"] = token

    def drop_after(self, file, n):
        """The next download of ``file`` sends ``n`` bytes, then drops the connection."""
        self.drops[file] = n

    def throttle_once(self, file, seconds_per_piece):
        """The next download of ``file`` comes in 64 KiB pieces ``seconds_per_piece`` apart
        (a slow link: for interrupting a download in flight)."""
        self.throttled[file] = seconds_per_piece

    def corrupt_once(self, file):
        """The next download of ``file`` has its last byte wrong."""
        self.corrupt.add(file)

    # -- server ------------------------------------------------------------------------

    def start(self):
        """Serve on two free ports (the Hub, and the CDN LFS downloads are redirected to);
        returns the Hub's URL, for HF_ENDPOINT."""
        hub = self

        def handler(on_cdn):
            class Handler(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    hub._handle(self, on_cdn)

                def do_HEAD(self):
                    hub._handle(self, on_cdn)

                def log_message(self, *args):
                    pass

            return Handler

        urls = []
        for on_cdn in (False, True):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(on_cdn))
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._servers.append((server, thread))
            urls.append("http://127.0.0.1:%d" % server.server_address[1])
        self.url, self.cdn_url = urls
        return self.url

    def stop(self):
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join()
        self._servers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- answers -----------------------------------------------------------------------

    def _handle(self, h, on_cdn):
        seen = {
            "method": h.command,
            "path": h.path,
            "range": h.headers.get("Range"),
            "authorization": h.headers.get("Authorization"),
            "cdn": on_cdn,
        }
        with self._lock:
            self.requests.append(seen)
            status, headers, body, cut = self._route(seen)
        h.send_response(status)
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        if h.command == "HEAD":
            return
        pace = seen.pop("pace", None)
        try:
            body = body if cut is None else body[:cut]
            piece = 1 << 16 if pace else max(len(body), 1)
            for i in range(0, len(body), piece):
                h.wfile.write(body[i:i + piece])
                h.wfile.flush()
                if pace:
                    time.sleep(pace)
            if cut is not None:
                h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _error(status, code, msg):
        return status, [("X-Error-Code", code), ("X-Error-Message", msg)], msg.encode(), None

    def _commit(self, repo, rev, auth):
        r = self.repos.get(repo)
        if r is None:
            return None, self._error(404, "RepoNotFound", "Repository not found")
        if r["gated"] is not None and auth != "Bearer " + r["gated"]:
            return None, self._error(
                401, "GatedRepo", "Access to model %s is restricted." % repo
            )
        if rev in r["commits"]:
            return rev, None
        if rev in r["refs"]:
            return r["refs"][rev], None
        return None, self._error(404, "RevisionNotFound", "Invalid rev id: %s" % rev)

    def _route(self, req):
        path = urllib.parse.urlsplit(req["path"]).path
        auth = req["authorization"]
        if path.startswith("/api/models/"):
            repo, sep, rev = path[len("/api/models/"):].partition("/revision/")
            if not sep:
                return self._error(404, "EntryNotFound", "no such route")
            commit, err = self._commit(repo, urllib.parse.unquote(rev), auth)
            if err:
                return err
            files = self.repos[repo]["commits"][commit]
            body = json.dumps(
                {
                    "id": repo,
                    "sha": commit,
                    "siblings": [{"rfilename": f} for f in sorted(files)],
                }
            ).encode()
            return 200, [("Content-Type", "application/json")], body, None
        if path.startswith("/cdn/"):
            blob = self.blobs.get(path[len("/cdn/"):])
            if blob is None:
                return self._error(404, "EntryNotFound", "no such blob")
            return self._content(blob[0], blob[1], req, [])
        parts = path.lstrip("/").split("/", 4)
        if len(parts) != 5 or parts[2] != "resolve":
            return self._error(404, "EntryNotFound", "no such route")
        org, name, _, rev, file = parts
        repo, file = org + "/" + name, urllib.parse.unquote(file)
        commit, err = self._commit(repo, urllib.parse.unquote(rev), auth)
        if err:
            return err
        data = self.repos[repo]["commits"][commit].get(file)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        if file.endswith(LFS_SUFFIXES):
            sha = sha256_hex(data)
            headers = [
                ("Location", "%s/cdn/%s" % (self.cdn_url, sha)),
                ("X-Repo-Commit", commit),
                ("X-Linked-Etag", '"%s"' % sha),
                ("X-Linked-Size", str(len(data))),
                ("ETag", '"%s"' % git_sha1_hex(b"an LFS pointer")),
            ]
            return 302, headers, b"", None
        headers = [("X-Repo-Commit", commit), ("ETag", '"%s"' % git_sha1_hex(data))]
        return self._content(file, data, req, headers)

    def _content(self, file, data, req, headers):
        """The bytes of ``file`` (a Range honoured), with the misbehaviours asked for."""
        total = len(data)
        cut = None
        if req["method"] == "GET":
            if file in self.corrupt:
                self.corrupt.discard(file)
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            cut = self.drops.pop(file, None)
            req["pace"] = self.throttled.pop(file, None)
        rng = req["range"] or ""
        if rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit():
            start = int(rng[6:-1])
            if start >= total:
                return 416, headers + [("Content-Range", "bytes */%d" % total)], b"", None
            headers = headers + [("Content-Range", "bytes %d-%d/%d" % (start, total - 1, total))]
            return 206, headers, data[start:], cut
        return 200, headers, data, cut
