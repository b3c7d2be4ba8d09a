//! Models from the Hugging Face Hub, against a mock Hub on 127.0.0.1 (tests/common/
//! mock_hub.rs) serving the tiny model: the cache layout huggingface_hub shares, only the
//! needed files, resumed downloads, checksums, 401/404, offline use, revisions, the
//! per-blob lock, and `lema prepare`/`info`/`generate` given a Hub id.

mod common;

use common::mock_hub::{MockHub, git_sha1_hex, sha256_hex};
use common::tiny::{Tiny, expect_error, expect_ok, tensor_names, text};
use lema::error::HubErrorKind;
use lema::hub::{HubId, HubOptions, download};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = "org/tiny";

/// Options for the mock, with the Hub cache and lema's cache under `home`.
fn opts(hub: &MockHub, home: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.url.clone(),
        cache_dir: home.join("hub"),
        lema_cache: home.join("lema"),
        token: None,
        offline: false,
        progress: false,
        cancel: None,
    }
}

/// The tiny model's files, and files of other formats that lema must not download.
fn repo_files(tiny: &Tiny) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(tiny.path("model"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    for junk in [
        "pytorch_model.bin",
        "tf_model.h5",
        "README.md",
        "onnx/model.onnx",
    ] {
        files.push((junk.to_string(), format!("not wanted: {junk}").into_bytes()));
    }
    files
}

fn id(spec: &str) -> HubId {
    HubId::parse(spec).unwrap()
}

fn content(files: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    files.iter().find(|(n, _)| n == name).unwrap().1.clone()
}

/// The kind and message of a Hub error.
fn hub_error(e: lema::Error) -> (HubErrorKind, String) {
    match &e {
        lema::Error::Hub { kind, .. } => (*kind, e.to_string()),
        other => panic!("expected a Hub error, got: {other}"),
    }
}

fn assert_has(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "expected {n:?} in: {msg}");
    }
}

/// The repository's folder in the Hub cache.
fn repo_dir(home: &Path) -> PathBuf {
    home.join("hub/models--org--tiny")
}

/// Paths under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

#[test]
fn downloads_only_the_needed_files_in_huggingface_hubs_layout() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    let commit = hub.add(REPO, "main", &files);
    let snap = download(&id(REPO), &opts(&hub, home.path())).unwrap();
    assert_eq!(snap.commit, commit);
    let root = repo_dir(home.path());
    assert_eq!(snap.dir, root.join("snapshots").join(&commit));
    let mut linked = tree(&snap.dir);
    linked.retain(|f| !f.starts_with('.'));
    // what the tiny model's folder holds that lema reads (not its random-model.json)
    let want = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    assert_eq!(
        linked, want,
        "the snapshot holds the model's files, no others"
    );
    for name in &linked {
        let body = content(&files, name);
        let etag = if name.ends_with(".safetensors") {
            sha256_hex(&body)
        } else {
            git_sha1_hex(&body)
        };
        let link = snap.dir.join(name);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../blobs").join(&etag),
            "{name}: a relative link to its blob"
        );
        assert_eq!(std::fs::read(&link).unwrap(), body, "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        commit
    );
    assert!(
        !tree(&root.join("blobs"))
            .iter()
            .any(|b| b.ends_with(".incomplete")),
        "no partial download left"
    );
    for s in hub.seen() {
        assert!(
            !["pytorch_model.bin", "tf_model.h5", "README.md", "onnx"]
                .iter()
                .any(|j| s.path.contains(j)),
            "asked for a file lema does not read: {s:?}"
        );
    }
    // a second download of the same commit asks only for the listing
    hub.clear_seen();
    download(&id(REPO), &opts(&hub, home.path())).unwrap();
    let seen = hub.seen();
    assert!(
        seen.len() == 1 && seen[0].path.starts_with("/api/models/"),
        "{seen:?}"
    );
}

#[test]
fn a_download_cut_off_is_kept_and_the_next_run_resumes_it_with_a_range_request() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    let commit = hub.add(REPO, "main", &files);
    let weights = content(&files, "model.safetensors");
    let sha = sha256_hex(&weights);
    let cut = weights.len() / 3;
    hub.drop_after("model.safetensors", cut);
    let o = opts(&hub, home.path());

    let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::Incomplete, "{msg}");
    assert_has(
        &msg,
        &[
            "model.safetensors",
            &format!("{cut} of {}", weights.len()),
            "resume",
        ],
    );
    let root = repo_dir(home.path());
    let part = root.join("blobs").join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);
    assert!(!root.join("blobs").join(&sha).exists());
    let link = root
        .join("snapshots")
        .join(&commit)
        .join("model.safetensors");
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "no snapshot link to a partial blob"
    );
    assert!(
        !root.join("refs/main").exists(),
        "no ref to a partial snapshot"
    );

    hub.clear_seen();
    let snap = download(&id(REPO), &o).unwrap();
    let got = std::fs::read(snap.dir.join("model.safetensors")).unwrap();
    assert_eq!(sha256_hex(&got), sha, "the resumed blob is the file");
    assert!(!part.exists());
    let cdn: Vec<_> = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert_eq!(
        cdn[0].range.as_deref(),
        Some(format!("bytes={cut}-").as_str()),
        "the second run asked only for the rest"
    );
}

#[test]
fn a_wrong_checksum_removes_the_download_and_links_nothing() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    let commit = hub.add(REPO, "main", &files);
    let o = opts(&hub, home.path());
    // config.json comes first: once it is right, the weights come wrong
    for file in ["config.json", "model.safetensors"] {
        hub.corrupt_once(file);
        let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
        assert_eq!(kind, HubErrorKind::Checksum, "{msg}");
        let what = if file == "config.json" {
            "git blob sha1"
        } else {
            "sha256"
        };
        assert_has(&msg, &[file, what, "removed", "run the command again"]);
        let root = repo_dir(home.path());
        let blobs = tree(&root.join("blobs"));
        assert!(
            !blobs.iter().any(|b| b.ends_with(".incomplete")),
            "{blobs:?}"
        );
        let link = root.join("snapshots").join(&commit).join(file);
        assert!(std::fs::symlink_metadata(&link).is_err(), "{file} linked");
    }
    let snap = download(&id(REPO), &o).unwrap();
    assert_eq!(
        std::fs::read(snap.dir.join("model.safetensors")).unwrap(),
        content(&files, "model.safetensors")
    );
}

#[test]
fn gated_and_missing_repositories_say_what_to_do() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    hub.add(REPO, "main", &files);
    hub.gate(REPO, "hf_secret");
    let mut o = opts(&hub, home.path());

    let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::Unauthorized, "{msg}");
    assert_has(
        &msg,
        &[REPO, "gated", "licence", "HF_TOKEN", "no token was sent"],
    );
    o.token = Some("hf_wrong".into());
    let (_, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_has(&msg, &["does not grant"]);
    o.token = Some("hf_secret".into());
    hub.clear_seen();
    download(&id(REPO), &o).unwrap();
    for s in hub.seen() {
        if s.on_cdn {
            assert_eq!(s.auth, None, "the token went to the CDN: {s:?}");
        } else {
            assert_eq!(s.auth.as_deref(), Some("Bearer hf_secret"), "{s:?}");
        }
    }
    assert!(
        hub.seen().iter().any(|s| s.on_cdn),
        "the weights came from the CDN"
    );

    let (kind, msg) = hub_error(download(&id("org/absent"), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::NotFound, "{msg}");
    assert_has(&msg, &["org/absent", "no such model repository"]);
    let (kind, msg) = hub_error(download(&id("org/tiny@v9"), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::NotFound, "{msg}");
    assert_has(&msg, &["org/tiny@v9", "no revision 'v9'"]);
    // through resolve, a 404 also says that no local path has that name
    let e = lema::hub::resolve(Path::new("org/absent"), &o)
        .unwrap_err()
        .to_string();
    assert_has(
        &e,
        &["no such model repository", "nor is there a local file"],
    );
    let e = lema::hub::resolve(Path::new("no/such/dir"), &o)
        .unwrap_err()
        .to_string();
    assert_has(&e, &["no such file or folder", "not a Hugging Face Hub id"]);
    // a local path that exists is returned as it is, shaped like an id or not
    let local = tiny.path("model");
    assert_eq!(lema::hub::resolve(&local, &o).unwrap(), local);
}

#[test]
fn unreachable_hub_mentions_offline_mode_and_the_endpoint() {
    let home = tempfile::tempdir().unwrap();
    let hub = MockHub::start();
    let mut o = opts(&hub, home.path());
    drop(hub);
    o.endpoint = "http://127.0.0.1:9".into();
    let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::Network, "{msg}");
    assert_has(
        &msg,
        &[
            REPO,
            "cannot reach",
            "127.0.0.1:9",
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE=1",
        ],
    );
}

#[test]
fn offline_mode_resolves_revisions_from_the_cache_only() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    let commit = hub.add(REPO, "main", &files);
    let mut o = opts(&hub, home.path());
    o.offline = true;
    let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::NotCached, "{msg}");
    assert_has(
        &msg,
        &[
            REPO,
            "HF_HUB_OFFLINE",
            "no revision 'main'",
            "without HF_HUB_OFFLINE",
        ],
    );

    o.offline = false;
    let online = download(&id(REPO), &o).unwrap();
    drop(hub);
    o.offline = true;
    o.endpoint = "http://127.0.0.1:9".into();
    let offline = download(&id(REPO), &o).unwrap();
    assert_eq!(offline.dir, online.dir);
    assert_eq!(offline.commit, commit);
    // an unreachable Hub without HF_HUB_OFFLINE falls back to the cached revision, as
    // huggingface_hub does; a revision the cache lacks still fails with the Network error
    o.offline = false;
    assert_eq!(download(&id(REPO), &o).unwrap().dir, online.dir);
    let (kind, msg) = hub_error(download(&id(&format!("{REPO}@v2")), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::Network, "{msg}");
    o.offline = true;
    // by commit id, with no ref needed
    assert_eq!(
        download(&id(&format!("{REPO}@{commit}")), &o).unwrap().dir,
        online.dir
    );
    // a snapshot missing its weights is not offered as complete
    std::fs::remove_file(online.dir.join("model.safetensors")).unwrap();
    let (kind, msg) = hub_error(download(&id(REPO), &o).unwrap_err());
    assert_eq!(kind, HubErrorKind::NotCached, "{msg}");
    assert_has(&msg, &["model.safetensors", &commit]);
}

#[test]
fn revisions_are_branches_tags_or_commits_each_with_its_snapshot() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    let main = hub.add(REPO, "main", &files);
    let mut v1_files = files.clone();
    for (n, body) in &mut v1_files {
        if n == "generation_config.json" || n == "config.json" {
            body.extend_from_slice(b"\n");
        }
    }
    let v1 = hub.add(REPO, "v1.0", &v1_files);
    assert_ne!(main, v1);
    let o = opts(&hub, home.path());
    let snap = download(&id("org/tiny@v1.0"), &o).unwrap();
    assert_eq!(snap.commit, v1);
    assert_eq!(
        std::fs::read(snap.dir.join("config.json")).unwrap(),
        content(&v1_files, "config.json")
    );
    let root = repo_dir(home.path());
    assert_eq!(std::fs::read_to_string(root.join("refs/v1.0")).unwrap(), v1);
    assert!(!root.join("refs/main").exists());
    let by_commit = download(&id(&format!("{REPO}@{main}")), &o).unwrap();
    assert_eq!(by_commit.dir, root.join("snapshots").join(&main));
    assert!(
        !root.join("refs").join(&main).exists(),
        "a commit id needs no ref"
    );
    // the weights, the same in both commits, are one blob
    let blobs: Vec<_> = tree(&root.join("blobs"))
        .into_iter()
        .filter(|b| b.len() == 64)
        .collect();
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    // `@rev` and a separate revision must agree
    let e = id("org/tiny@v1.0").with_revision(Some("main")).unwrap_err();
    assert_has(&e.to_string(), &["two revisions"]);
}

/// The tiny model's weights as two shards and an index, with a consolidated copy that
/// lema must not download.
fn sharded_files(tiny: &Tiny) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(tiny.path("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut files: Vec<(String, Vec<u8>)> = repo_files(tiny)
        .into_iter()
        .filter(|(n, _)| n != "model.safetensors")
        .collect();
    let mut map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        files.push((shard.clone(), safetensors::serialize(views, None).unwrap()));
        for n in part {
            map.insert(n.clone(), shard.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    files.push((
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    ));
    files.push(("consolidated.safetensors".into(), bytes));
    files
}

/// `lema args` in `dir` with the Hugging Face environment of `home` and the mock.
fn lema(dir: &Path, home: &Path, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lema"));
    cmd.args(args).current_dir(dir);
    for k in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "LEMA_CACHE",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn lema_prepare_a_hub_id_and_use_it_wherever_a_model_is_taken() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = sharded_files(&tiny);
    let commit = hub.add(REPO, "main", &files);
    let (dir, url) = (tiny.dir.path(), hub.url.clone());

    let o = lema(
        dir,
        home.path(),
        &url,
        &["prepare", REPO, "-o", "out", "--quiet"],
        &[],
    );
    expect_ok(&o);
    let original = tiny.path("model/model.safetensors");
    assert_eq!(
        common::read_tensors(&tiny.path("out/model.safetensors")),
        common::read_tensors(&original),
        "the shards prepared into the tiny model's tensors"
    );
    assert!(tiny.path("out/tokenizer.json").is_file());
    assert!(
        !hub.seen().iter().any(|s| s.path.contains("consolidated")),
        "the index's shards only"
    );
    let snap = repo_dir(home.path()).join("snapshots").join(&commit);
    assert!(snap.join("model-00002-of-00002.safetensors").is_file());

    // `info` prepares it once into lema's cache, and reuses it
    let prepared = home
        .path()
        .join("lema/prepared/models--org--tiny")
        .join(&commit);
    let o = lema(dir, home.path(), &url, &["info", REPO], &[]);
    expect_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("layers: 2"), "{}", text(&o));
    assert_eq!(
        tensor_names(&prepared.join("model.safetensors")),
        tensor_names(&original)
    );
    let mtime = std::fs::metadata(prepared.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    hub.clear_seen();
    let o = lema(
        dir,
        home.path(),
        &url,
        &[
            "generate",
            "--model",
            REPO,
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
            "hello",
        ],
        &[],
    );
    expect_ok(&o);
    let seen = hub.seen();
    assert!(
        seen.len() == 1 && seen[0].path.starts_with("/api/models/"),
        "a prepared commit downloads nothing: {seen:?}"
    );
    assert_eq!(
        std::fs::metadata(prepared.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime,
        "and is not prepared again"
    );

    // offline, with the Hub gone: from the caches
    drop(hub);
    let o = lema(
        dir,
        home.path(),
        "http://127.0.0.1:9",
        &["info", REPO],
        &[("HF_HUB_OFFLINE", "1")],
    );
    expect_ok(&o);
    // without HF_HUB_OFFLINE an unreachable Hub falls back to the cache, and says so
    let o = lema(dir, home.path(), "http://127.0.0.1:9", &["info", REPO], &[]);
    expect_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_has(
        &err,
        &[
            REPO,
            "cannot reach",
            "using the cached commit",
            "HF_HUB_OFFLINE=1",
        ],
    );
    let o = lema(
        dir,
        home.path(),
        "http://127.0.0.1:9",
        &["prepare", "org/other", "-o", "x"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    expect_error(&o, &["org/other", "HF_HUB_OFFLINE", "run once without"]);
}

#[test]
fn lema_prepare_reports_hub_errors_by_file_and_a_rerun_resumes() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    hub.add(REPO, "main", &files);
    let (dir, url) = (tiny.dir.path(), hub.url.clone());
    let o = lema(
        dir,
        home.path(),
        &url,
        &["prepare", "org/absent", "-o", "out"],
        &[],
    );
    expect_error(&o, &["org/absent", "no such model repository"]);
    let o = lema(
        dir,
        home.path(),
        &url,
        &["prepare", "org/tiny@nope", "-o", "out"],
        &[],
    );
    expect_error(&o, &["no revision 'nope'"]);
    let o = lema(
        dir,
        home.path(),
        &url,
        &[
            "prepare",
            REPO,
            "--revision",
            "main",
            "-o",
            "out",
            "--quiet",
        ],
        &[],
    );
    expect_ok(&o);
    let o = lema(
        dir,
        home.path(),
        &url,
        &["prepare", "model", "--revision", "main", "-o", "o2"],
        &[],
    );
    expect_error(&o, &["--revision is for a Hub id"]);

    let home2 = tempfile::tempdir().unwrap();
    hub.drop_after("model.safetensors", 100);
    let o = lema(
        dir,
        home2.path(),
        &url,
        &["prepare", REPO, "-o", "out2"],
        &[],
    );
    expect_error(
        &o,
        &[
            "model.safetensors",
            "stopped at 100 of",
            "run the command again to resume",
        ],
    );
    let o = lema(
        dir,
        home2.path(),
        &url,
        &["prepare", REPO, "-o", "out2", "--quiet"],
        &[],
    );
    expect_ok(&o);
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.range.as_deref() == Some("bytes=100-"))
    );
}

#[test]
fn a_blob_being_written_by_another_process_is_waited_for_not_written_twice() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let files = repo_files(&tiny);
    hub.add(REPO, "main", &files);
    let weights = content(&files, "model.safetensors");
    let sha = sha256_hex(&weights);
    let lock_path = home
        .path()
        .join("hub/.locks/models--org--tiny")
        .join(format!("{sha}.lock"));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lema"));
    cmd.args(["prepare", REPO, "-o", "out"])
        .current_dir(tiny.dir.path())
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", &hub.url)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !hub
        .seen()
        .iter()
        .any(|s| s.method == "HEAD" && s.path.ends_with("/model.safetensors"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "lema never asked for the weights"
        );
        if child.try_wait().unwrap().is_some() {
            panic!(
                "lema ended early:\n{}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "lema did not wait for the lock"
    );
    assert!(!hub.seen().iter().any(|s| s.path.starts_with("/cdn/")));
    // the "other process" finishes the blob, then lets go
    let blob = repo_dir(home.path()).join("blobs").join(&sha);
    std::fs::write(&blob, &weights).unwrap();
    drop(lock);
    let o = child.wait_with_output().unwrap();
    expect_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("waiting for another process"));
    assert!(
        !hub.seen().iter().any(|s| s.path.starts_with("/cdn/")),
        "the blob was not downloaded again"
    );
    assert!(tiny.path("out/model.safetensors").is_file());
}

#[test]
fn train_and_eval_take_a_hub_id_from_a_config_file_or_a_flag() {
    let (tiny, home, hub) = (
        Tiny::new(None),
        tempfile::tempdir().unwrap(),
        MockHub::start(),
    );
    let commit = hub.add(REPO, "main", &repo_files(&tiny));
    let lines: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
        .collect();
    tiny.write("d.jsonl", &(lines.join("\n") + "\n"));
    // a config file in a subfolder: its `model`, a Hub id, is not taken as cfg/org/tiny
    std::fs::create_dir(tiny.path("cfg")).unwrap();
    tiny.write(
        "cfg/train.toml",
        "model = \"org/tiny\"\ndata = \"../d.jsonl\"\noutput_dir = \"../run\"\nmax_seq_length = 32\nbatch_size = 4\nlora_rank = 4\ndevice = \"cpu\"\nmax_steps = 2\n",
    );
    let (dir, url) = (tiny.dir.path(), hub.url.clone());
    let o = lema(
        dir,
        home.path(),
        &url,
        &["train", "--config", "cfg/train.toml"],
        &[],
    );
    expect_ok(&o);
    assert!(
        tiny.path("run/adapter/adapter_model.safetensors").is_file(),
        "{}",
        text(&o)
    );
    let prepared = home
        .path()
        .join("lema/prepared/models--org--tiny")
        .join(&commit);
    let saved = std::fs::read_to_string(tiny.path("run/config.toml")).unwrap_or_default();
    assert!(
        saved.contains(&prepared.display().to_string()),
        "the run records the prepared file, so a resume needs no Hub: {saved}"
    );
    let o = lema(
        dir,
        home.path(),
        &url,
        &[
            "eval", "--model", REPO, "--data", "d.jsonl", "--device", "cpu", "--json",
        ],
        &[],
    );
    expect_ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"loss\""),
        "{}",
        text(&o)
    );
}
