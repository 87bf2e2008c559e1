//! The distillation stage saves real checkpoints: `xkd run` on a small recipe, then
//! `xkd checkpoint ls|verify|digest` on what it left, on a local store and on a real
//! S3-compatible server (s3s-fs) reached only through the standard AWS variables.
//!
//! One test function on purpose: the two runs share a cache of pretrained stand-ins, and
//! running them one after another keeps a 2-core machine from pretraining twice at once.

mod common;

use common::{json_of, s3, small_recipe, xkd};
use serde_json::Value;
use std::path::{Path, PathBuf};

const RUN_ID: &str = "ckpt-test";
const STEPS: u64 = 25;
const EVERY: u64 = 10;
const KEEP: usize = 2;

/// Runs the small recipe into `out` with `extra` overrides and `env`; returns report.json and
/// everything the run printed.
fn run(out: &Path, cache: &Path, extra: &[String], env: &[(String, String)]) -> (Value, String) {
    let mut sets = small_recipe(cache, RUN_ID, STEPS, EVERY, KEEP);
    sets.extend_from_slice(extra);
    let (code, stdout, stderr) = xkd(&common::run_args(out, &sets, &[]), env);
    let printed = format!("{stdout}{stderr}");
    assert_eq!(code, 0, "xkd run failed:\n{printed}");
    let report = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    (serde_json::from_str(&report).unwrap(), printed)
}

/// What every store must show after the run: the newest `KEEP` of the steps saved (10, 20,
/// 25) are committed and verify, older ones are gone, `final_checkpoint` is the last, and its
/// parameter digest is the worker's digest of the parameters it ended with.
fn check_store(report: &Value, run_url: &str, env: &[(String, String)]) {
    let listed = json_of(&["checkpoint", "ls", "--json", run_url], env);
    let steps: Vec<u64> = listed
        .as_array()
        .expect("ls --json prints a list")
        .iter()
        .map(|row| row["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(
        steps,
        vec![STEPS, 20],
        "committed checkpoints, newest first"
    );
    for &step in &steps {
        let url = format!("{run_url}/ckpt/{step:010}");
        let v = json_of(&["checkpoint", "verify", "--json", &url], env);
        assert_eq!(v["ok"], true, "{url} does not verify: {v}");
        let names: Vec<&str> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        for name in ["student.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(names.contains(&name), "{url} lacks {name}: {names:?}");
        }
    }
    let last = format!("{run_url}/ckpt/{STEPS:010}");
    assert_eq!(report["final_checkpoint"].as_str(), Some(last.as_str()));
    let d = json_of(&["checkpoint", "digest", "--json", &last], env);
    assert_eq!(
        d["sha256"], report["student_digest"],
        "the final checkpoint holds other parameters than the worker ended with"
    );
}

fn check_state(state: &Value) {
    assert_eq!(state["step"], STEPS);
    assert_eq!(state["world_size"], 2);
    let per_step = 2 * state["batch_per_rank"].as_u64().unwrap();
    assert_eq!(state["cursor"].as_u64().unwrap(), STEPS * per_step);
    assert_eq!(state["schedule"]["next_step"], STEPS);
    assert!(!state["hard_classes"].as_array().unwrap().is_empty());
    assert_eq!(state["config_digest"].as_str().unwrap().len(), 16);
}

#[test]
fn distillation_commits_checkpoints_to_local_and_s3_stores() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoints");
    let _ = std::fs::remove_dir_all(root.join("runs"));
    let cache = root.join("cache");

    // The default store: file://<out>/checkpoints.
    let out = root.join("runs/local");
    let (report, printed) = run(&out, &cache, &[], &[]);
    let store = format!("file://{}", out.join("checkpoints").display());
    check_store(&report, &format!("{store}/{RUN_ID}"), &[]);
    assert!(
        printed.contains("checkpoint committed"),
        "commits are logged:\n{printed}"
    );
    let dir = out.join(format!("checkpoints/{RUN_ID}/ckpt/{STEPS:010}"));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    check_state(&state);
    let dirs = std::fs::read_dir(out.join(format!("checkpoints/{RUN_ID}/ckpt")))
        .unwrap()
        .count();
    assert_eq!(dirs, KEEP, "pruned checkpoints leave no directories behind");

    // The same recipe against a real S3-compatible server: same parameters, same digest.
    let server = s3::S3Server::start();
    let env = server.env();
    let out = root.join("runs/s3");
    let url = server.url("runs");
    let (s3_report, printed) = run(&out, &cache, &[format!("checkpoint.url={url}")], &env);
    check_store(&s3_report, &format!("{url}/{RUN_ID}"), &env);
    assert_eq!(s3_report["student_digest"], report["student_digest"]);
    assert!(
        !printed.contains(server.secret()),
        "the secret key shows up in the run's output"
    );
    for log in std::fs::read_dir(out.join("logs")).unwrap() {
        let path = log.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(server.secret()),
            "the secret key is in {}",
            path.display()
        );
    }
}
