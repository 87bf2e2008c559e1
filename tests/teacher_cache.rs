//! `distill.teacher = "cached"` through the real binary and a real store: the cached run's
//! student is the online run's bit for bit, its distillation never loads the teacher nor the
//! frozen student whose answers anchor the replay rows (each worker's own log says so, and no
//! frozen model is built after that line: both come from the cache), and a caching
//! stage started again keeps the whole shards and makes again the damaged one and the one
//! whose caching was interrupted (shard without its digest object); and the cache works the
//! same in a real S3-compatible server (s3s-fs). Replay rows trained to their labels (the
//! default `distill.replay_target`) need no anchors: the cache holds none, no frozen student is
//! built in either mode, and the two modes again train the same student.
//!
//! One test function on purpose: the runs share a cache of pretrained stand-ins, one after
//! another on a 2-core machine.

mod common;

use common::{find, records, s3, small_recipe, xkd};
use serde_json::Value;
use std::path::{Path, PathBuf};

const STEPS: u64 = 8;
/// The replay rows anchored to the frozen student, whose answers the cache then holds too.
const ANCHORED: &str = "distill.replay_target=\"student\"";
const CACHED: &str = "distill.teacher=\"cached\"";
const SHARD_STEPS: u64 = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("teacher-cache")
}

/// `xkd --log-format json run` of the small recipe into `out`; returns report.json and the
/// coordinator's log records.
fn run(out: &Path, run_id: &str, extra: &[&str]) -> (Value, Vec<Value>) {
    run_env(out, run_id, extra, &[])
}

fn run_env(
    out: &Path,
    run_id: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> (Value, Vec<Value>) {
    let mut sets = small_recipe(&root().join("cache"), run_id, STEPS, 4, 2);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args = vec!["--log-format".to_string(), "json".into()];
    args.extend(common::run_args(out, &sets, &[]));
    let (code, stdout, stderr) = xkd(&args, env);
    assert_eq!(code, 0, "xkd run failed:\n{stdout}{stderr}");
    let log = out.with_extension("log");
    std::fs::write(&log, &stderr).unwrap();
    (common::report(out), records(&log))
}

/// Each worker log's records, one list per rank.
fn worker_logs(out: &Path) -> Vec<Vec<Value>> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(out.join("logs"))
        .expect("worker logs")
        .map(|e| e.unwrap().path())
        .collect();
    logs.sort();
    logs.iter().map(|p| records(p)).collect()
}

fn loads_teacher(r: &Value) -> bool {
    r["message"] == "frozen model" && r["modality"] == "Visual"
}

/// The pretrained student loaded frozen: the replay rows' anchor.
fn loads_frozen_student(r: &Value) -> bool {
    r["message"] == "frozen model" && r["modality"] == "Audio"
}

fn cache_ready(log: &[Value]) -> (u64, u64) {
    let ready = find(log, "teacher cache ready");
    let last = ready.last().expect("the teacher cache stage ran");
    (
        last["reused"].as_u64().unwrap(),
        last["made"].as_u64().unwrap(),
    )
}

#[test]
fn a_cached_teacher_trains_the_online_student_and_its_shards_are_remade_when_damaged() {
    let _ = std::fs::remove_dir_all(root().join("runs"));
    let shard_steps = format!("distill.cache_shard_steps={SHARD_STEPS}");
    let cached_sets = [ANCHORED, CACHED, &shard_steps];

    let online_out = root().join("runs/online");
    let (online, _) = run(&online_out, "tc-online", &[ANCHORED]);
    // The checks below see a teacher load and a frozen student load where there are ones.
    for log in worker_logs(&online_out) {
        assert!(
            log.iter().any(loads_teacher),
            "online run loads the teacher"
        );
        assert!(
            log.iter().any(loads_frozen_student),
            "online run loads the frozen student"
        );
    }

    let out = root().join("runs/cached");
    let (cached, log) = run(&out, "tc-cached", &cached_sets);
    assert_eq!(
        cached["student_digest"], online["student_digest"],
        "the cached run's student differs from the online run's"
    );
    assert_eq!(cache_ready(&log), (0, STEPS.div_ceil(SHARD_STEPS)));
    for (rank, log) in worker_logs(&out).iter().enumerate() {
        let from = log
            .iter()
            .position(|r| {
                r["message"] == "teacher answers from the cache; the teacher is not loaded"
            })
            .unwrap_or_else(|| panic!("rank {rank} never distilled from the cache"));
        assert!(
            !log[from..].iter().any(loads_teacher),
            "rank {rank} loaded the teacher while distilling from the cache"
        );
        // The replay rows' anchors come from the cache too: no frozen student either.
        assert!(
            !log[from..].iter().any(loads_frozen_student),
            "rank {rank} loaded the frozen student while distilling from the cache"
        );
        let anchor: Vec<&Value> = log[from..]
            .iter()
            .filter(|r| r["message"] == "replay anchor")
            .collect();
        assert_eq!(anchor.len(), 1, "rank {rank}: {anchor:?}");
        assert_eq!(anchor[0]["source"], "the teacher cache", "rank {rank}");
    }

    // Damage shard 1 and take shard 2's digest away (a caching stage killed between the two
    // puts leaves that); shard 0 stays whole. The run started again remakes exactly those two,
    // the same bytes as before, and its student is unchanged.
    let run_dir = out.join("checkpoints/tc-cached/run");
    let shard = |i: u64, ext: &str| -> PathBuf {
        let name = std::fs::read_dir(&run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with("teacher-") && n.ends_with(&format!("-{i:06}.{ext}")))
            .unwrap_or_else(|| panic!("no shard {i} .{ext} in {}", run_dir.display()));
        run_dir.join(name)
    };
    let original = std::fs::read(shard(1, "safetensors")).unwrap();
    let mut damaged = original.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x40;
    std::fs::write(shard(1, "safetensors"), &damaged).unwrap();
    std::fs::remove_file(shard(2, "sha256")).unwrap();

    let (again, log) = run(&out, "tc-cached", &cached_sets);
    assert_eq!(cache_ready(&log), (1, 2));
    assert_eq!(std::fs::read(shard(1, "safetensors")).unwrap(), original);
    assert_eq!(again["student_digest"], online["student_digest"]);
    let remade: Vec<(u64, String)> = worker_logs(&out)
        .iter()
        .flatten()
        .filter(|r| r["message"] == "teacher cache shard to make")
        .map(|r| {
            (
                r["shard"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        remade
            .iter()
            .any(|(i, why)| *i == 1 && why.contains("damaged")),
        "{remade:?}"
    );
    assert!(
        remade
            .iter()
            .any(|(i, why)| *i == 2 && why.contains("no digest")),
        "{remade:?}"
    );

    // The same through a real S3-compatible server: the cache is only in the store.
    let server = s3::S3Server::start();
    let url = server.url("runs");
    let store = format!("checkpoint.url=\"{url}\"");
    let mut sets = cached_sets.to_vec();
    sets.push(&store);
    let (s3_run, log) = run_env(&root().join("runs/s3"), "tc-s3", &sets, &server.env());
    assert_eq!(s3_run["student_digest"], online["student_digest"]);
    assert_eq!(cache_ready(&log), (0, STEPS.div_ceil(SHARD_STEPS)));
    let manifest = find(&log, "teacher cache ready")[0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(manifest.starts_with(&url), "{manifest} is not in {url}");

    // Replay rows trained to their labels: no frozen student in either mode, and the same
    // student from both.
    let labels_out = root().join("runs/labels-online");
    let (labels_online, _) = run(&labels_out, "tc-labels-online", &[]);
    let labels_cached_out = root().join("runs/labels-cached");
    let (labels_cached, _) = run(
        &labels_cached_out,
        "tc-labels-cached",
        &[CACHED, &shard_steps],
    );
    assert_eq!(
        labels_cached["student_digest"], labels_online["student_digest"],
        "with labelled replay rows, the cached run's student differs from the online run's"
    );
    assert_ne!(labels_online["student_digest"], online["student_digest"]);
    for out in [&labels_out, &labels_cached_out] {
        for (rank, log) in worker_logs(out).iter().enumerate() {
            assert!(
                !log.iter().any(loads_frozen_student),
                "rank {rank} of {} loaded a frozen student for labelled replay rows",
                out.display()
            );
            let anchor: Vec<&Value> = log
                .iter()
                .filter(|r| r["message"] == "replay anchor")
                .collect();
            assert_eq!(anchor.len(), 1, "rank {rank}: {anchor:?}");
            assert_eq!(anchor[0]["source"], "the clips' labels", "rank {rank}");
        }
    }
}
