//! A model's Hub id, `org/name` with an optional `@revision`, told apart from a local path.

use crate::error::{Error, Result};

/// The longest part (organisation or name) of a repository id the Hub accepts.
const MAX_PART: usize = 96;

/// Endings of a local model file: a missing `out/model.safetensors` is a missing file, not
/// a Hub repository called `model.safetensors`.
const FILE_ENDINGS: &[&str] = &[
    ".safetensors",
    ".gguf",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".json",
    ".jsonl",
    ".txt",
    ".toml",
];

/// A model repository on the Hub and the revision asked for (a branch, a tag or a commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// `None`: the default branch, `main`.
    pub revision: Option<String>,
}

impl HubId {
    /// `spec` as a Hub id (`org/name` or `org/name@revision`), or `None` when it is not
    /// shaped like one (a path with more or fewer parts, characters a repository name
    /// cannot hold, a model-file ending).
    pub fn parse(spec: &str) -> Option<HubId> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (spec, None),
        };
        if !is_repo_id(repo) {
            return None;
        }
        let name = repo.split_once('/').map_or(repo, |(_, n)| n);
        let lower = name.to_ascii_lowercase();
        if FILE_ENDINGS.iter().any(|e| lower.ends_with(e)) {
            return None;
        }
        if let Some(rev) = revision
            && !is_revision(rev)
        {
            return None;
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// The revision asked for: the one given, else `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The id with `revision` (a separate argument) applied: an error when the id names
    /// another one after its `@`.
    pub fn with_revision(mut self, revision: Option<&str>) -> Result<HubId> {
        let Some(rev) = revision else {
            return Ok(self);
        };
        if !is_revision(rev) {
            return Err(Error::config(format!(
                "revision {rev:?}: not a branch, tag or commit name"
            )));
        }
        match &self.revision {
            Some(own) if own != rev => Err(Error::config(format!(
                "{}@{own} and --revision {rev} name two revisions; give one",
                self.repo
            ))),
            _ => {
                self.revision = Some(rev.to_string());
                Ok(self)
            }
        }
    }

    /// The repository's folder in the cache: `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// `org/name@revision` for messages (`org/name` on the default branch).
    pub fn display(&self) -> String {
        match &self.revision {
            Some(r) => format!("{}@{r}", self.repo),
            None => self.repo.clone(),
        }
    }
}

/// Whether `rev` is a 40-hex-digit commit id.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` is shaped like a Hub repository id, `owner/name`, by the Hub's rules
/// (each part letters, digits, `-`, `_`, `.`, at most 96 of them, neither starting nor
/// ending with `.` or `-`, no `--` or `..`).
pub fn is_repo_id(s: &str) -> bool {
    matches!(s.split_once('/'), Some((owner, name)) if is_part(owner) && is_part(name))
}

/// An organisation or model name as the Hub allows them.
fn is_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PART
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !p.starts_with(['.', '-'])
        && !p.ends_with(['.', '-'])
        && !p.contains("--")
        && !p.contains("..")
}

/// A branch, tag or commit name that is safe as a path under `refs/` (git allows `/` in
/// it, as in `refs/pr/1`, but no empty or `..` component).
fn is_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 255
        && rev
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\\' && b != b'@')
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0").unwrap();
        assert_eq!(id.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(id.revision(), "v1.0");
        assert_eq!(
            id.folder_name(),
            "models--HuggingFaceTB--SmolLM2-135M-Instruct"
        );
        assert_eq!(
            HubId::parse("Qwen/Qwen2.5-0.5B").unwrap().revision(),
            "main"
        );
        assert_eq!(
            HubId::parse("org/name@refs/pr/1").unwrap().revision(),
            "refs/pr/1"
        );
        for not_an_id in [
            "model",
            "./org/name",
            "/abs/name",
            "a/b/c",
            "out/model.safetensors",
            "models/llama.gguf",
            "org/na me",
            "org/..",
            "org/a--b",
            "org/name@",
            "org/name@../x",
            "org/name@a//b",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn a_separate_revision_must_agree() {
        let id = HubId::parse("org/name@dev").unwrap();
        assert_eq!(
            id.clone().with_revision(Some("dev")).unwrap().revision(),
            "dev"
        );
        let e = id.with_revision(Some("main")).unwrap_err().to_string();
        assert!(e.contains("two revisions"), "{e}");
        let id = HubId::parse("org/name").unwrap();
        assert_eq!(id.with_revision(Some("v2")).unwrap().revision(), "v2");
    }
}
