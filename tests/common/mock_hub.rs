//! A mock Hugging Face Hub on 127.0.0.1 for the Hub tests: the test starts it (any free
//! port), fills it with repositories, and it stops when dropped. It serves what lema asks
//! of the real Hub, with the real Hub's headers:
//!
//! * `GET /api/models/{org}/{name}/revision/{rev}`: `sha` and `siblings[].rfilename`;
//! * `HEAD`/`GET /{org}/{name}/resolve/{rev}/{file}`: a small file directly (ETag: its git
//!   blob sha1); a `.safetensors` file (an LFS file) as a 302 to `/cdn/{sha256}` with
//!   `X-Linked-Etag`/`X-Linked-Size`; `X-Repo-Commit` on both;
//! * `GET /cdn/{sha256}` on a second port (another origin, as the real CDN is), with
//!   `Range: bytes=N-` answered by a 206;
//!
//! and misbehaves on demand: a gated repository (401 without the right token), unknown
//! repositories and revisions (404 with `X-Error-Code`), a download cut after N bytes
//! (once), wrong bytes for a file (once). Every request is recorded.

use sha1::Digest;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A request the mock saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The `Range` header.
    pub range: Option<String>,
    /// The `Authorization` header.
    pub auth: Option<String>,
    /// Whether it came to the CDN's port.
    pub on_cdn: bool,
}

#[derive(Default)]
struct Repo {
    /// commit → file → content
    commits: HashMap<String, BTreeMap<String, Vec<u8>>>,
    /// branch or tag → commit
    refs: HashMap<String, String>,
    /// The token a gated repository asks for.
    gated: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    /// sha256 → content, for the CDN
    blobs: HashMap<String, (String, Vec<u8>)>,
    /// file name → bytes sent before the connection is dropped (once)
    drop_after: HashMap<String, usize>,
    /// file names served with a wrong byte (once)
    corrupt: Vec<String>,
    seen: Vec<Seen>,
}

/// The running mock; stops when dropped.
pub struct MockHub {
    /// `http://127.0.0.1:PORT`, for HF_ENDPOINT.
    pub url: String,
    /// The CDN that LFS downloads are redirected to (another port).
    pub cdn_url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

pub fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether the Hub keeps `file` in LFS (and redirects its downloads).
fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

impl MockHub {
    pub fn start() -> MockHub {
        let (hub, cdn) = (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(hub, false), (cdn, true)]
            .into_iter()
            .map(|(listener, on_cdn)| {
                let (st, sp, cdn_url) = (state.clone(), stop.clone(), cdn_url.clone());
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        if sp.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let (st, cdn_url) = (st.clone(), cdn_url.clone());
                        std::thread::spawn(move || serve(conn, &st, &cdn_url, on_cdn));
                    }
                })
            })
            .collect();
        MockHub {
            url,
            cdn_url,
            state,
            stop,
            threads,
        }
    }

    /// Add a commit of `repo` holding `files`, named by `rev` (a branch or tag); returns
    /// its commit id.
    pub fn add(&self, repo: &str, rev: &str, files: &[(String, Vec<u8>)]) -> String {
        let mut h = sha1::Sha1::new();
        h.update(repo.as_bytes());
        h.update(rev.as_bytes());
        for (name, body) in files {
            h.update(name.as_bytes());
            h.update(body);
        }
        let commit = hex(&h.finalize());
        let mut s = self.state.lock().unwrap();
        for (name, body) in files {
            s.blobs
                .insert(sha256_hex(body), (name.clone(), body.clone()));
        }
        let r = s.repos.entry(repo.to_string()).or_default();
        r.commits
            .insert(commit.clone(), files.iter().cloned().collect());
        r.refs.insert(rev.to_string(), commit.clone());
        commit
    }

    /// Answer 401 (GatedRepo) unless the request carries `Bearer token`.
    pub fn gate(&self, repo: &str, token: &str) {
        let mut s = self.state.lock().unwrap();
        s.repos.get_mut(repo).unwrap().gated = Some(token.to_string());
    }

    /// The next download of `file` sends `n` bytes, then drops the connection.
    pub fn drop_after(&self, file: &str, n: usize) {
        self.state
            .lock()
            .unwrap()
            .drop_after
            .insert(file.to_string(), n);
    }

    /// The next download of `file` has one byte wrong.
    pub fn corrupt_once(&self, file: &str) {
        self.state.lock().unwrap().corrupt.push(file.to_string());
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Forget the requests seen so far.
    pub fn clear_seen(&self) {
        self.state.lock().unwrap().seen.clear();
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for url in [&self.url, &self.cdn_url] {
            let _ = TcpStream::connect(url.trim_start_matches("http://"));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One response: status, headers, body (and where to cut it).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut_after: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_after: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn error(status: u16, code: &str, msg: &str) -> Reply {
        let mut r = Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", msg);
        r.body = msg.as_bytes().to_vec();
        r
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>, cdn: &str, on_cdn: bool) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
        on_cdn,
    };
    let reply = {
        let mut s = state.lock().unwrap();
        s.seen.push(seen.clone());
        route(&mut s, &seen, cdn)
    };
    let mut out = conn;
    let len = reply.body.len();
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    let has_len = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    let _ = out.write_all(head.as_bytes());
    if method != "HEAD" {
        let n = reply.cut_after.unwrap_or(len).min(len);
        let _ = out.write_all(&reply.body[..n]);
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 3 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The commit of `repo` that `rev` names, or the error reply.
fn commit_of(s: &State, repo: &str, rev: &str, auth: Option<&str>) -> Result<String, Reply> {
    let Some(r) = s.repos.get(repo) else {
        return Err(Reply::error(404, "RepoNotFound", "Repository not found"));
    };
    if let Some(t) = &r.gated
        && auth != Some(format!("Bearer {t}").as_str())
    {
        return Err(Reply::error(
            401,
            "GatedRepo",
            "Access to model is restricted. You must have access to it and be authenticated to access it.",
        ));
    }
    if r.commits.contains_key(rev) {
        return Ok(rev.to_string());
    }
    r.refs
        .get(rev)
        .cloned()
        .ok_or_else(|| Reply::error(404, "RevisionNotFound", "Invalid rev id"))
}

fn route(s: &mut State, req: &Seen, cdn: &str) -> Reply {
    let auth = req.auth.as_deref();
    if let Some(rest) = req.path.strip_prefix("/api/models/") {
        let Some((repo, rev)) = rest.split_once("/revision/") else {
            return Reply::error(404, "EntryNotFound", "no such route");
        };
        let commit = match commit_of(s, repo, &decode(rev), auth) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let files = &s.repos[repo].commits[&commit];
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let mut r = Reply::new(200).header("Content-Type", "application/json");
        r.body = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings})
            .to_string()
            .into_bytes();
        return r;
    }
    if let Some(sha) = req.path.strip_prefix("/cdn/") {
        let Some((file, body)) = s.blobs.get(sha).cloned() else {
            return Reply::error(404, "EntryNotFound", "no such blob");
        };
        return content(s, &file, body, req);
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let mut it = req.path.trim_start_matches('/').splitn(5, '/');
    let (org, name, resolve, rev, file) = (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        decode(it.next().unwrap_or("")),
    );
    if resolve != "resolve" {
        return Reply::error(404, "EntryNotFound", "no such route");
    }
    let repo = format!("{org}/{name}");
    let commit = match commit_of(s, &repo, &decode(rev), auth) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(body) = s.repos[&repo].commits[&commit].get(&file).cloned() else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    if is_lfs(&file) {
        let sha = sha256_hex(&body);
        return Reply::new(302)
            .header("Location", format!("{cdn}/cdn/{sha}"))
            .header("X-Repo-Commit", commit.clone())
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", body.len().to_string())
            .header("ETag", format!("\"{}\"", git_sha1_hex(b"an LFS pointer")));
    }
    let etag = git_sha1_hex(&body);
    content(s, &file, body, req)
        .header("X-Repo-Commit", commit)
        .header("ETag", format!("\"{etag}\""))
}

/// The bytes of `file` (a Range honoured), with the misbehaviours asked for.
fn content(s: &mut State, file: &str, mut body: Vec<u8>, req: &Seen) -> Reply {
    let total = body.len();
    let from = req
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    if req.method == "GET"
        && let Some(i) = s.corrupt.iter().position(|f| f == file)
    {
        s.corrupt.remove(i);
        let last = body.len() - 1;
        body[last] ^= 0xff;
    }
    let cut_after = if req.method == "GET" {
        s.drop_after.remove(file)
    } else {
        None
    };
    let mut r = match from {
        Some(f) if f >= total => {
            return Reply::new(416).header("Content-Range", format!("bytes */{total}"));
        }
        Some(f) => {
            let mut r =
                Reply::new(206).header("Content-Range", format!("bytes {f}-{}/{total}", total - 1));
            r.body = body[f..].to_vec();
            r
        }
        None => {
            let mut r = Reply::new(200);
            r.body = body;
            r
        }
    };
    r.cut_after = cut_after;
    r
}
