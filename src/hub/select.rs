//! Which files of a repository lema downloads: the safetensors weights (one file, or the
//! index and every shard it names), config.json, and the tokenizer, generation and chat
//! template files present. Never the same weights again as PyTorch pickles, TensorFlow,
//! Flax, ONNX or GGUF files, nor what lives in subfolders.

use super::id::HubId;
use crate::error::{Error, HubErrorKind, Result};
use crate::import::hf::side_file_names;

/// The single-file weights, and the index of sharded ones.
pub const WEIGHTS: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
const CONFIG: &str = "config.json";

/// The files to fetch first from a repository that lists `files`: config.json, the side
/// files it has, and the index (whose shards come next, [`shards_named`]) or the
/// single weights file. A repository without safetensors weights is refused with what it
/// has instead.
pub fn first_files(id: &HubId, files: &[String]) -> Result<Vec<String>> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let weights = if has(INDEX) {
        INDEX
    } else if has(WEIGHTS) {
        WEIGHTS
    } else {
        return Err(no_weights(id, files));
    };
    if !has(CONFIG) {
        return Err(Error::hub(
            HubErrorKind::NotFound,
            id.display(),
            "the repository has no config.json: it is not a transformers model lema can prepare",
        ));
    }
    let mut out = vec![CONFIG.to_string()];
    for f in side_file_names() {
        if has(f) {
            out.push(f.to_string());
        }
    }
    out.push(weights.to_string());
    Ok(out)
}

/// The shards an index names, each checked against the repository's listing.
pub fn shards_named(id: &HubId, shards: Vec<String>, files: &[String]) -> Result<Vec<String>> {
    if let Some(missing) = shards.iter().find(|s| !files.contains(s)) {
        return Err(Error::hub(
            HubErrorKind::NotFound,
            format!("{} {INDEX}", id.display()),
            format!("names the shard {missing}, which the repository does not hold"),
        ));
    }
    Ok(shards)
}

/// The error for a repository with no `model.safetensors` nor its index, naming what it
/// holds instead.
fn no_weights(id: &HubId, files: &[String]) -> Error {
    let top: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .collect();
    let with = |ends: &[&str]| -> Vec<&str> {
        top.iter()
            .copied()
            .filter(|f| ends.iter().any(|e| f.ends_with(e)))
            .collect()
    };
    let (safetensors, pickles, gguf) = (
        with(&[".safetensors"]),
        with(&[".bin", ".pt", ".pth", ".ckpt"]),
        with(&[".gguf"]),
    );
    let msg = if !safetensors.is_empty() {
        format!(
            "no {WEIGHTS} nor {INDEX}, only {}: lema needs the transformers layout (one \
             {WEIGHTS}, or shards named by an index)",
            safetensors.join(", ")
        )
    } else if !gguf.is_empty() {
        format!(
            "the repository holds GGUF files ({}), no safetensors: download the one you want \
             and give its path to `lema prepare`",
            gguf.join(", ")
        )
    } else if !pickles.is_empty() {
        format!(
            "the repository has only PyTorch pickle weights ({}), which lema does not load: \
             look for a revision with safetensors (often a refs/pr/N revision named \"Adding \
             safetensors\", given as {}@refs/pr/N) or convert them with transformers",
            pickles.join(", "),
            id.repo
        )
    } else {
        "the repository has no model weights lema reads (no model.safetensors)".to_string()
    };
    Error::hub(HubErrorKind::NotFound, id.display(), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_needed_files() {
        let id = HubId::parse("org/m").unwrap();
        let repo = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "onnx/model.onnx",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ]);
        assert_eq!(
            first_files(&id, &repo).unwrap(),
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
                "chat_template.jinja",
                "model.safetensors"
            ])
        );
        let sharded = names(&[
            "config.json",
            INDEX,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
        ]);
        assert_eq!(
            first_files(&id, &sharded).unwrap(),
            names(&["config.json", INDEX])
        );
        let e = shards_named(&id, names(&["model-00003-of-00002.safetensors"]), &sharded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model-00003-of-00002.safetensors"), "{e}");
    }

    #[test]
    fn a_repository_without_safetensors_says_what_it_has() {
        let id = HubId::parse("org/m").unwrap();
        let e = first_files(&id, &names(&["config.json", "pytorch_model.bin"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pytorch_model.bin") && e.contains("refs/pr/N"),
            "{e}"
        );
        let e = first_files(&id, &names(&["m.Q4_K_M.gguf"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("GGUF"), "{e}");
        let e = first_files(&id, &names(&[WEIGHTS]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
