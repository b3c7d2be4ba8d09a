//! The Hub's HTTP API as lema uses it: a repository's listing at a revision, a file's
//! metadata (the `HEAD` of its resolve URL), and a file's bytes from an offset. Every
//! failure becomes an [`Error::Hub`] that names the repository and file and says what to
//! do.

use super::id::HubId;
use crate::error::{Error, HubErrorKind, Result};
use std::time::Duration;
use ureq::http::{HeaderMap, Response};
use ureq::{Agent, Body};

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// The largest repository listing read (JSON).
const MAX_LISTING: u64 = 64 << 20;

/// A repository at one commit: the commit and the files it holds.
pub struct RepoInfo {
    pub commit: String,
    pub files: Vec<String>,
}

/// What the `HEAD` of a file's resolve URL says about it.
pub struct FileMeta {
    /// Content id: sha256 of an LFS file, git blob sha1 of another (quotes removed).
    pub etag: String,
    pub size: u64,
    /// Where its bytes are fetched: the LFS redirect's target, or the resolve URL.
    pub url: String,
}

/// A Hub at an endpoint, with the token sent to it (never to another host, such as the
/// CDN that LFS files are redirected to).
pub struct Client {
    agent: Agent,
    endpoint: String,
    token: Option<String>,
}

#[derive(Clone, Copy)]
enum Method {
    Head,
    Get,
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(format!("lema/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            agent,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// The commit `id`'s revision names and the files of the repository there.
    pub fn repo_info(&self, id: &HubId) -> Result<RepoInfo> {
        let subject = id.display();
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            id.repo,
            quote(id.revision(), false)
        );
        let (mut resp, _) = self.request(Method::Get, &url, None, false, &subject)?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, id, None));
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_LISTING)
            .read_to_string()
            .map_err(|e| self.transport_error(&subject, &e.to_string()))?;
        let bad = |msg: &str| {
            Error::hub(
                HubErrorKind::Protocol,
                &subject,
                format!(
                    "{url} answered {msg}: is HF_ENDPOINT ({}) a Hugging Face Hub?",
                    self.endpoint
                ),
            )
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(&format!("JSON that does not parse ({e})")))?;
        let commit = v["sha"]
            .as_str()
            .filter(|s| super::id::is_commit(s))
            .ok_or_else(|| bad("no commit id ('sha')"))?
            .to_string();
        let files = v["siblings"]
            .as_array()
            .ok_or_else(|| bad("no file list ('siblings')"))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
            .collect();
        Ok(RepoInfo { commit, files })
    }

    /// The etag, size and download URL of `file` at `commit`.
    pub fn file_meta(&self, id: &HubId, commit: &str, file: &str) -> Result<FileMeta> {
        let subject = format!("{} {file}", id.display());
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.endpoint,
            id.repo,
            quote(file, true)
        );
        // relative redirects (a renamed repository) are followed; an absolute one is the
        // LFS redirect, whose own headers describe the file
        let (resp, at) = self.request(Method::Head, &url, None, true, &subject)?;
        let status = resp.status();
        if !status.is_success() && !status.is_redirection() {
            return Err(self.status_error(&resp, id, Some(file)));
        }
        let h = resp.headers();
        let missing = |what: &str| {
            Error::hub(
                HubErrorKind::Protocol,
                &subject,
                format!(
                    "{url} answered without {what}: is HF_ENDPOINT ({}) a Hugging Face Hub?",
                    self.endpoint
                ),
            )
        };
        let etag = header(h, "x-linked-etag")
            .or_else(|| header(h, "etag"))
            .map(normalize_etag)
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
            .ok_or_else(|| missing("an ETag"))?;
        let size = header(h, "x-linked-size")
            .or_else(|| header(h, "content-length"))
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| missing("the file's size"))?;
        let url = match (status.is_redirection(), header(h, "location")) {
            (true, Some(loc)) => join(&at, loc),
            (true, None) => return Err(missing("a Location for its redirect")),
            (false, _) => at,
        };
        Ok(FileMeta { etag, size, url })
    }

    /// A GET of `url` from byte `from` on (a `Range` request when `from > 0`), redirects
    /// followed: a 200 (the whole file), a 206 (the rest) or a 416 (nothing left), any
    /// other status an error.
    pub fn open(&self, url: &str, from: u64, id: &HubId, file: &str) -> Result<Response<Body>> {
        let subject = format!("{} {file}", id.display());
        let (resp, _) = self.request(
            Method::Get,
            url,
            Some(from).filter(|&f| f > 0),
            false,
            &subject,
        )?;
        match resp.status().as_u16() {
            200 | 206 | 416 => Ok(resp),
            _ => Err(self.status_error(&resp, id, Some(file))),
        }
    }

    /// Send a request, following redirects (only relative ones when `relative_only`);
    /// returns the last response and its URL.
    fn request(
        &self,
        method: Method,
        url: &str,
        range_from: Option<u64>,
        relative_only: bool,
        subject: &str,
    ) -> Result<(Response<Body>, String)> {
        let mut url = url.to_string();
        for _ in 0..MAX_REDIRECTS {
            let mut req = match method {
                Method::Head => self.agent.head(&url),
                Method::Get => self.agent.get(&url),
            }
            .header("Accept-Encoding", "identity");
            if let Some(from) = range_from {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let Some(t) = &self.token
                && origin(&url) == origin(&self.endpoint)
            {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req
                .call()
                .map_err(|e| self.transport_error(subject, &e.to_string()))?;
            let location = header(resp.headers(), "location").map(str::to_string);
            match location {
                Some(loc) if resp.status().is_redirection() => {
                    if relative_only && is_absolute(&loc) {
                        return Ok((resp, url));
                    }
                    url = join(&url, &loc);
                }
                _ => return Ok((resp, url)),
            }
        }
        Err(Error::hub(
            HubErrorKind::Protocol,
            subject,
            format!("more than {MAX_REDIRECTS} redirects from {}", self.endpoint),
        ))
    }

    /// The error for a request that never got an answer.
    pub fn transport_error(&self, subject: &str, cause: &str) -> Error {
        Error::hub(
            HubErrorKind::Network,
            subject,
            format!(
                "cannot reach the Hugging Face Hub at {} ({cause}); check the connection, or \
                 HF_ENDPOINT if you use a mirror; set HF_HUB_OFFLINE=1 to use only the \
                 models already in the cache",
                self.endpoint
            ),
        )
    }

    /// The error for an HTTP status that is not a success: what it means for `id` (and
    /// `file`) and what to do, with the Hub's own message when it gave one.
    fn status_error(&self, resp: &Response<Body>, id: &HubId, file: Option<&str>) -> Error {
        let h = resp.headers();
        let code = header(h, "x-error-code").unwrap_or("");
        let page = format!("{}/{}", self.endpoint, id.repo);
        let token = match &self.token {
            Some(_) => "the token sent (HF_TOKEN or $HF_HOME/token) does not grant it",
            None => "no token was sent (set HF_TOKEN, or log in so that $HF_HOME/token holds one)",
        };
        let status = resp.status().as_u16();
        let (kind, msg) = match (status, code) {
            (401 | 403, "GatedRepo") => (
                HubErrorKind::Unauthorized,
                format!(
                    "{} is a gated model: accept its licence on {page} while logged in, and set \
                     HF_TOKEN to a token of that account ({token})",
                    id.repo
                ),
            ),
            (401 | 403, _) => (
                HubErrorKind::Unauthorized,
                format!(
                    "the Hub refused access (HTTP {status}): {} is private or gated, or does \
                     not exist; {token}. Check the id, accept the licence on {page} if it \
                     is gated, and set HF_TOKEN to a token that can read it",
                    id.repo
                ),
            ),
            (404, "RevisionNotFound") => (
                HubErrorKind::NotFound,
                format!(
                    "no revision '{}' in {}: give a branch, tag or commit id of it",
                    id.revision(),
                    id.repo
                ),
            ),
            (404, "EntryNotFound") | (404, _) if file.is_some() => (
                HubErrorKind::NotFound,
                format!(
                    "no such file at revision '{}' of {} (HTTP 404)",
                    id.revision(),
                    id.repo
                ),
            ),
            (404, _) => (
                HubErrorKind::NotFound,
                format!(
                    "no such model repository or revision '{}' on {} (HTTP 404): check the id \
                     on {page}",
                    id.revision(),
                    self.endpoint
                ),
            ),
            (429, _) => (
                HubErrorKind::Network,
                "the Hub is rate-limiting requests (HTTP 429): wait and run again; a token \
                 (HF_TOKEN) raises the limit"
                    .to_string(),
            ),
            (500.., _) => (
                HubErrorKind::Network,
                format!("the Hub failed (HTTP {status}): run again later"),
            ),
            _ => (
                HubErrorKind::Protocol,
                format!("unexpected answer HTTP {status} from {}", self.endpoint),
            ),
        };
        let said = header(h, "x-error-message")
            .map(|m| format!(" (the Hub says: {m})"))
            .unwrap_or_default();
        let subject = match file {
            Some(f) => format!("{} {f}", id.display()),
            None => id.display(),
        };
        Error::hub(kind, subject, format!("{msg}{said}"))
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// An etag without its weak marker and quotes.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_absolute(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// `scheme://host[:port]` of an absolute URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// `location` (absolute, host-relative or path-relative) resolved against `base`.
fn join(base: &str, location: &str) -> String {
    if is_absolute(location) {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let path_end = base.find('?').unwrap_or(base.len());
        let dir = base[..path_end].rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{location}")
    }
}

/// Percent-encode `s` for a URL path (a revision like `refs/pr/1` as one segment; a file
/// name with its `/` kept when `keep_slash`).
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("a b/c.json", true), "a%20b/c.json");
        assert_eq!(origin("http://127.0.0.1:9/x/y"), "http://127.0.0.1:9");
        assert_eq!(join("http://h:1/a/b?q", "/c"), "http://h:1/c");
        assert_eq!(join("http://h:1/a/b", "c"), "http://h:1/a/c");
        assert_eq!(join("http://h:1/a", "https://cdn/x"), "https://cdn/x");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }
}
