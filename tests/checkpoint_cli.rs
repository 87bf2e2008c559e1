//! `xkd checkpoint ls|verify|digest` as a user meets them: on a local store and on a real
//! S3-compatible server configured only through the standard AWS variables.

mod common;

use bytes::Bytes;
use common::{s3, xkd};
use std::path::{Path, PathBuf};
use xkd_checkpoint::{Env, Store, StoreOptions};

/// A safetensors file of one f32 tensor with values from `seed`, and some file metadata.
fn params(seed: f32, note: &str) -> Bytes {
    let data: Vec<u8> = (0..16)
        .flat_map(|i| (seed + i as f32).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 4], &data)
        .expect("view");
    let meta = std::collections::HashMap::from([("note".to_string(), note.to_string())]);
    Bytes::from(safetensors::serialize([("w", view)], Some(meta)).expect("serialize"))
}

/// Writes (and, unless `commit` is false, commits) a checkpoint of `run` at `step`.
fn save(store: &Store, run: &str, step: u64, seed: f32, commit: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let objects = [
            ("student.safetensors", params(seed, &format!("step {step}"))),
            ("optimizer.safetensors", params(-seed, "moments")),
            ("state.json", Bytes::from(format!("{{\"step\":{step}}}"))),
        ];
        let mut entries = Vec::new();
        for (name, bytes) in objects {
            entries.push(store.put_object(run, step, name, bytes).await.unwrap());
        }
        if commit {
            store.commit(run, step, &entries).await.unwrap();
        }
    });
}

fn local_store(dir: &Path) -> (Store, String) {
    let url = format!("file://{}", dir.join("store").display());
    (Store::open(&url).unwrap(), url)
}

fn object_file(dir: &Path, run: &str, step: u64, name: &str) -> PathBuf {
    dir.join("store")
        .join(run)
        .join(format!("ckpt/{step:010}/{name}"))
}

#[test]
fn ls_lists_committed_checkpoints_newest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, url) = local_store(tmp.path());
    save(&store, "run-a", 100, 1.0, true);
    save(&store, "run-a", 200, 2.0, true);
    save(&store, "run-a", 300, 3.0, false);
    let (code, out, err) = xkd(&["checkpoint", "ls", &format!("{url}/run-a")], &[]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].trim_start().starts_with("200") && rows[0].contains("0000000200"),
        "{out}"
    );
    assert!(rows[1].trim_start().starts_with("100"), "{out}");
    assert!(
        out.contains("STEP") && out.contains("SIZE") && out.contains("AGE"),
        "{out}"
    );

    // A plain path works too, and --json is machine-readable.
    let plain = tmp.path().join("store/run-a");
    let (code, out, err) = xkd(
        &["checkpoint", "ls", "--json", plain.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["step"], 200);
    assert_eq!(rows[1]["step"], 100);
    assert!(rows[0]["size"].as_u64().unwrap() > 0);
}

#[test]
fn verify_passes_then_names_the_corrupt_object() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, url) = local_store(tmp.path());
    save(&store, "run-v", 100, 1.0, true);
    save(&store, "run-v", 200, 2.0, true);
    let run_url = format!("{url}/run-v");
    let (code, out, err) = xkd(&["checkpoint", "verify", &run_url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0000000200: ok"), "{out}");

    let student = object_file(tmp.path(), "run-v", 200, "student.safetensors");
    let mut bytes = std::fs::read(&student).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&student, bytes).unwrap();

    let (code, out, err) = xkd(&["checkpoint", "verify", &run_url], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("student.safetensors: sha256 mismatch"),
        "{err}"
    );
    assert!(out.contains("BAD  student.safetensors"), "{out}");
    assert!(!out.contains("BAD  optimizer"), "{out}");

    let (code, out, _) = xkd(
        &[
            "checkpoint",
            "verify",
            "--json",
            &format!("{run_url}/ckpt/0000000200"),
        ],
        &[],
    );
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    let bad: Vec<&str> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["status"] != "ok")
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(bad, ["student.safetensors"]);

    // The older checkpoint is fine on its own; --all reports the run as bad.
    let (code, _, err) = xkd(
        &[
            "checkpoint",
            "verify",
            &format!("{run_url}/ckpt/0000000100"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = xkd(&["checkpoint", "verify", "--all", &run_url], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("0000000100: ok") && out.contains("0000000200: 1 of 3 objects bad"),
        "{out}"
    );

    // Digest refuses the corrupt parameters rather than hash them.
    let (code, _, err) = xkd(&["checkpoint", "digest", &run_url], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("student.safetensors"), "{err}");
}

#[test]
fn digest_is_equal_for_equal_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, url) = local_store(tmp.path());
    save(&store, "run-x", 40, 5.0, true);
    save(&store, "run-y", 80, 5.0, true); // same values, other step and file metadata
    save(&store, "run-z", 40, 6.0, true);
    let digest = |run: &str| {
        let (code, out, err) = xkd(&["checkpoint", "digest", &format!("{url}/{run}")], &[]);
        assert_eq!(code, 0, "{err}");
        let (sha, where_) = out.trim().split_once("  ").expect("sha  url");
        assert_eq!(sha.len(), 64, "{out}");
        assert!(where_.contains(run), "{out}");
        sha.to_string()
    };
    assert_eq!(digest("run-x"), digest("run-y"));
    assert_ne!(digest("run-x"), digest("run-z"));
    let (code, out, _) = xkd(
        &[
            "checkpoint",
            "digest",
            "--json",
            &format!("{url}/run-x/ckpt/0000000040"),
        ],
        &[],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["sha256"].as_str().unwrap(), v["tensors"].as_u64()),
        (digest("run-x").as_str(), Some(1))
    );
}

#[test]
fn bad_urls_exit_2_and_empty_runs_say_so() {
    for url in ["ftp://host/run", "s3://bucket", "/tmp/x/run/ckpt/400"] {
        let (code, _, err) = xkd(&["checkpoint", "verify", url], &[]);
        assert_eq!(code, 2, "{url}: {err}");
        assert!(err.contains(url), "{err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("nothing-here");
    let (code, _, err) = xkd(&["checkpoint", "digest", run.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no committed checkpoint in run nothing-here"),
        "{err}"
    );
    let (code, _, err) = xkd(&["checkpoint", "ls", run.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(err.contains("no committed checkpoint"), "{err}");
}

#[test]
fn commands_reach_s3_through_the_aws_environment_only() {
    let server = s3::S3Server::start();
    let store = Store::open_with(
        &server.url("runs"),
        StoreOptions {
            env: Env::Explicit(server.env()),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    save(&store, "run-s3", 10, 1.0, true);
    save(&store, "run-s3", 20, 2.0, true);
    let run_url = server.url("runs/run-s3");
    let env = server.env();
    let (code, out, err) = xkd(&["checkpoint", "ls", &run_url], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("s3://ckpt/runs/run-s3/ckpt/0000000020"),
        "{out}"
    );
    let (code, out, err) = xkd(&["checkpoint", "verify", "--all", &run_url], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0000000010: ok"), "{out}");
    let (code, _, err) = xkd(&["checkpoint", "digest", &run_url], &env);
    assert_eq!(code, 0, "{err}");

    std::fs::write(
        server.file_of("runs/run-s3/ckpt/0000000020/state.json"),
        "{}",
    )
    .unwrap();
    let (code, out, err) = xkd(&["checkpoint", "verify", &run_url], &env);
    assert_eq!(code, 1);
    assert!(err.contains("state.json: size mismatch"), "{err}");
    for text in [&out, &err] {
        assert!(!text.contains(server.secret()), "secret printed: {text}");
    }
}
