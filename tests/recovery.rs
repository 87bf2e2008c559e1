//! A run survives losing its processes and its store (issue 5's "must show"): a worker
//! killed with SIGKILL, the coordinator stopped with SIGTERM and resumed on fewer workers, a
//! worker stopped with SIGTERM, the coordinator killed with SIGKILL and started again (reusing
//! the decisions its first start stored, without probing again), the S3-compatible server
//! down for 15 s, a corrupted checkpoint, and a finished run started again. Every run is a
//! real `xkd run` with real worker processes; the store is a directory or a real s3s-fs server.
//!
//! The tests take a lock so only one run trains at a time (they share a cache of pretrained
//! stand-ins and a 2-core machine), and compare against one undisturbed run made once.

mod common;

use common::{
    find, hold_env, is, json_of, release, report, run_args, s3, seconds_of_day, serial, signal,
    small_recipe, xkd, Background,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// 60 steps with a checkpoint every 20: a test acts after the commit of step 20, while rank 0
/// is held there (`start_held`), so step 40 cannot have been committed whatever the machine.
const STEPS: u64 = 60;
const EVERY: u64 = 20;
const KEEP: usize = 3;
/// A whole small run takes seconds; this only keeps a hung run from hanging the suite.
const LIMIT: Duration = Duration::from_secs(600);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("recovery")
}

fn recipe(run_id: &str) -> Vec<String> {
    small_recipe(&root().join("cache"), run_id, STEPS, EVERY, KEEP)
}

fn fresh(name: &str) -> PathBuf {
    common::fresh_dir(&root(), name)
}

/// The undisturbed 2-worker run every test compares with: its output directory and the
/// parameter digest of its final checkpoint. Made once, under the caller's lock.
fn reference() -> &'static (PathBuf, String) {
    static REFERENCE: OnceLock<(PathBuf, String)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let out = fresh("reference");
        let (code, _, err) = xkd(&run_args(&out, &recipe("rec"), &[]), &[]);
        assert_eq!(code, 0, "the undisturbed run failed:\n{err}");
        let digest = final_digest(&out, "rec", &[]);
        (out, digest)
    })
}

fn store_url(out: &Path) -> String {
    format!("file://{}", out.join("checkpoints").display())
}

/// `xkd checkpoint digest` of checkpoint STEPS of `run_id` under `out`'s default store.
fn final_digest(out: &Path, run_id: &str, env: &[(String, String)]) -> String {
    let url = format!("{}/{run_id}/ckpt/{STEPS:010}", store_url(out));
    json_of(&["checkpoint", "digest", "--json", &url], env)["sha256"]
        .as_str()
        .expect("sha256")
        .to_string()
}

fn committed(step: u64) -> impl Fn(&Value) -> bool {
    move |r| is(r, "checkpoint committed", "step", step)
}

/// Process id of the worker with rank `rank`, from the coordinator's join records.
fn worker_pid(run: &mut Background, rank: u64) -> i32 {
    let joined = run.wait_for("worker joined", LIMIT, |r| {
        is(r, "worker joined", "rank", rank)
    });
    joined["pid"].as_i64().expect("pid") as i32
}

/// Starts `xkd run` with `sets` (and `extra` environment) holding rank 0 after step EVERY,
/// and returns once checkpoint EVERY is committed and rank 0 is held: from then until
/// `release(&release_file(out))` (or a stop order) no rank takes a step, so the newest commit
/// is EVERY's. Worker pids are read first (ranks 0 and 1).
fn start_held(out: &Path, sets: &[String], extra: &[(String, String)]) -> (Background, [i32; 2]) {
    let mut env = vec![hold_env(EVERY, &release_file(out))];
    env.extend_from_slice(extra);
    let mut run = Background::start(&run_args(out, sets, &[]), &env, &out.with_extension("log"));
    let pids = [worker_pid(&mut run, 0), worker_pid(&mut run, 1)];
    run.wait_held(out, EVERY, LIMIT);
    (run, pids)
}

fn release_file(out: &Path) -> PathBuf {
    out.with_extension("release")
}

#[test]
fn a_killed_worker_is_replaced_and_the_run_ends_bit_identical() {
    let _serial = serial();
    let (_, want) = reference();
    let out = fresh("killed");
    let (run, [_, pid]) = start_held(&out, &recipe("killed"), &[]);
    signal(pid.into(), "-KILL");
    release(&release_file(&out));
    let (code, text) = run.wait(LIMIT);
    assert_eq!(code, 0, "the run did not complete on its own:\n{text}");
    let records = common::records(&out.with_extension("log"));
    let restarts = find(&records, "restarting the workers");
    assert_eq!(restarts.len(), 1, "one restart:\n{text}");
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    assert_eq!(
        resumed[0]["step"], EVERY,
        "resumed from the checkpoint before the kill"
    );
    assert_eq!(
        &final_digest(&out, "killed", &[]),
        want,
        "the final checkpoint differs from the undisturbed run's"
    );
    assert_eq!(report(&out)["student_digest"].as_str(), Some(want.as_str()));
}

#[test]
fn sigterm_checkpoints_and_a_run_on_one_worker_resumes_it() {
    let _serial = serial();
    let (reference_out, _) = reference();
    let out = fresh("preempted");
    let log = out.with_extension("log");
    let (run, _) = start_held(&out, &recipe("preempted"), &[]);
    // The stop order itself releases rank 0, which votes to stop in the next step's
    // all-reduce: every rank stops after step EVERY + 1, and rank 0 checkpoints it.
    signal(run.child.id().into(), "-TERM");
    let (code, text) = run.wait(LIMIT);
    assert_eq!(code, 0, "SIGTERM must checkpoint and exit 0:\n{text}");
    let records = common::records(&log);
    assert_eq!(
        find(
            &records,
            "run preempted; start it again with the same run id to resume"
        )
        .len(),
        1,
        "{text}"
    );
    // The stop step was checkpointed: the newest commit is the step after the hold.
    let stop = find(&records, "checkpoint committed")
        .last()
        .and_then(|r| r["step"].as_u64())
        .expect("a commit");
    assert_eq!(stop, EVERY + 1, "{text}");
    assert!(
        !out.join("report.json").exists(),
        "a preempted run writes no report"
    );

    // The same run id on one worker: resumes from the stop step and finishes.
    let log = out.with_extension("resumed.log");
    let again = Background::start(
        &run_args(&out, &recipe("preempted"), &["--workers", "1"]),
        &[],
        &log,
    );
    let (code, text) = again.wait(LIMIT);
    assert_eq!(code, 0, "the resumed run failed:\n{text}");
    let records = common::records(&log);
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    assert_eq!(resumed[0]["step"], stop);
    assert_eq!(resumed[0]["saved_by_workers"], 2);
    assert_eq!(resumed[0]["workers"], 1);
    // One worker of batch 2b sums in another order than two of b: equal within rounding.
    let a = xkd_worker::train::load_params(&reference_out.join("student.safetensors")).unwrap();
    let b = xkd_worker::train::load_params(&out.join("student.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = (0f32, String::new());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            if (x - y).abs() > worst.0 {
                worst = ((x - y).abs(), na.clone());
            }
        }
    }
    assert!(
        worst.0 <= 1e-5,
        "max abs difference {} in {}",
        worst.0,
        worst.1
    );
}

#[test]
fn a_preempted_worker_checkpoints_and_the_run_goes_on_bit_identical() {
    let _serial = serial();
    let (_, want) = reference();
    let out = fresh("worker-term");
    let log = out.with_extension("log");
    // No restart allowed: a worker's own preemption is not a failure and is not counted.
    let mut sets = recipe("worker-term");
    sets.push("control.max_restarts=0".into());
    let (mut run, [_, pid]) = start_held(&out, &sets, &[]);
    signal(pid.into(), "-TERM");
    // Rank 1 has taken the order (it votes to stop in the next all-reduce) before rank 0
    // goes on: the stop lands a step or two after the hold, never at the end.
    run.wait_until("rank 1's stop", LIMIT, || {
        common::worker_records(&out)
            .iter()
            .any(|r| r["message"] == "SIGTERM: stopping after the current step")
            .then_some(())
    });
    release(&release_file(&out));
    let (code, text) = run.wait(LIMIT);
    assert_eq!(code, 0, "the run did not complete on its own:\n{text}");
    let records = common::records(&log);
    let restarts = find(&records, "restarting the workers");
    assert_eq!(restarts.len(), 1, "{text}");
    assert!(
        restarts[0]["error"].as_str().unwrap().contains("preempted"),
        "{text}"
    );
    assert_eq!(restarts[0]["counted"], false, "{text}");
    // Every rank stopped at the same step and rank 0 checkpointed it; the new generation
    // resumed there.
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    let step = resumed[0]["step"].as_u64().unwrap();
    assert!(
        step > EVERY && step <= EVERY + 2,
        "resumed at {step}:\n{text}"
    );
    assert!(
        records.iter().any(|r| committed(step)(r)),
        "the stop step was not committed:\n{text}"
    );
    assert_eq!(&final_digest(&out, "worker-term", &[]), want);
}

#[test]
fn a_killed_coordinator_started_again_resumes_from_the_store() {
    let _serial = serial();
    let (_, want) = reference();
    let out = fresh("coordinator-killed");
    let (run, workers) = start_held(&out, &recipe("coordinator-killed"), &[]);
    signal(run.child.id().into(), "-KILL");
    let (code, _) = run.wait(LIMIT);
    assert_eq!(code, -1, "killed by a signal");
    // Its workers go with it (they would otherwise write checkpoints beside the resumed run).
    let start = std::time::Instant::now();
    while workers
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "workers outlived the coordinator"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = out.with_extension("again.log");
    let again = Background::start(
        &run_args(&out, &recipe("coordinator-killed"), &[]),
        &[],
        &log,
    );
    let (code, text) = again.wait(LIMIT);
    assert_eq!(code, 0, "{text}");
    let records = common::records(&log);
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    assert_eq!(resumed[0]["step"], EVERY);
    assert_eq!(&final_digest(&out, "coordinator-killed", &[]), want);

    // The first start probed and stored its decisions before distilling; the second took
    // them from the store and never probed (the probe always ends in `hard classes decided`).
    let first = common::records(&out.with_extension("log"));
    let decided = find(&first, "hard classes decided");
    let stored = find(&first, "run decisions stored");
    assert_eq!((decided.len(), stored.len()), (1, 1), "first start");
    let url = stored[0]["url"].as_str().expect("url");
    assert!(
        url.ends_with("/coordinator-killed/run/decisions.json"),
        "{url}"
    );
    let reused = find(&records, "reusing the run's decisions");
    assert_eq!(reused.len(), 1, "{text}");
    assert_eq!(reused[0]["url"], url, "{text}");
    assert_eq!(reused[0]["hard"], decided[0]["hard"], "{text}");
    assert!(find(&records, "hard classes decided").is_empty(), "{text}");
    assert!(find(&records, "run decisions stored").is_empty(), "{text}");
    assert!(
        records
            .iter()
            .all(|r| r["stage"] != "probe" && r["stage"] != "eval_before"),
        "{text}"
    );
}

#[test]
fn a_store_down_for_15_s_loses_no_checkpoint() {
    let _serial = serial();
    let _ = reference(); // the cache of pretrained models, made outside the outage
    let mut server = s3::S3Server::start();
    let env = server.env();
    let url = server.url("runs");
    let out = fresh("outage");
    let mut sets = recipe("outage");
    sets.push(format!("checkpoint.url={url}"));
    let (run, _) = start_held(&out, &sets, &env);
    server.stop();
    release(&release_file(&out));
    // The outage's length, not a wait for the run: it trains on while the store is down.
    std::thread::sleep(Duration::from_secs(15));
    server.resume();
    let (code, text) = run.wait(LIMIT);
    assert_eq!(code, 0, "the run did not survive the outage:\n{text}");
    let run_url = format!("{url}/outage");
    let steps = common::committed_steps(&run_url, &env);
    assert_eq!(
        steps,
        vec![60, 40, 20],
        "every checkpoint committed:\n{text}"
    );
    for step in steps {
        let ckpt = format!("{run_url}/ckpt/{step:010}");
        let v = json_of(&["checkpoint", "verify", "--json", &ckpt], &env);
        assert_eq!(v["ok"], true, "{ckpt}: {v}");
    }
    let records = common::records(&out.with_extension("log"));
    assert!(
        find(&records, "checkpoint not committed; training goes on").is_empty(),
        "{text}"
    );
    // The outage really held up a save: step 40 could only be taken after the store went down.
    let at = |step| {
        records
            .iter()
            .find(|r| committed(step)(r))
            .map(|r| seconds_of_day(r["timestamp"].as_str().unwrap()))
            .unwrap()
    };
    assert!(
        at(40) - at(20) >= 14.0,
        "commit 40 came {} s after commit 20",
        at(40) - at(20)
    );
    assert_eq!(
        report(&out)["final_checkpoint"].as_str(),
        Some(format!("{run_url}/ckpt/{STEPS:010}").as_str())
    );
}

#[test]
fn a_corrupt_checkpoint_is_named_skipped_and_replaced() {
    let _serial = serial();
    let (reference_out, want) = reference();
    let out = fresh("corrupt");
    copy_dir(
        &reference_out.join("checkpoints/rec"),
        &out.join("checkpoints/rec"),
    );
    let newest = out.join(format!("checkpoints/rec/ckpt/{STEPS:010}"));
    let params = newest.join("student.safetensors");
    let mut bytes = std::fs::read(&params).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&params, bytes).unwrap();

    let ckpt = format!("{}/rec/ckpt/{STEPS:010}", store_url(&out));
    let (code, stdout, stderr) = xkd(&["checkpoint", "verify", &ckpt], &[]);
    assert_ne!(
        code, 0,
        "verify passed a corrupt checkpoint:\n{stdout}{stderr}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("student.safetensors"),
        "verify does not name the bad object:\n{stdout}{stderr}"
    );

    let log = out.with_extension("log");
    let run = Background::start(&run_args(&out, &recipe("rec"), &[]), &[], &log);
    let (code, text) = run.wait(LIMIT);
    assert_eq!(code, 0, "{text}");
    let records = common::records(&log);
    let skipped = find(
        &records,
        "checkpoint does not verify: skipped, and discarded so this step can be saved again",
    );
    assert_eq!(skipped.len(), 1, "{text}");
    assert_eq!(skipped[0]["step"], STEPS);
    assert!(skipped[0]["reason"]
        .as_str()
        .unwrap()
        .contains("student.safetensors"));
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(
        resumed[0]["step"],
        STEPS - EVERY,
        "resumed from the previous one"
    );
    // Steps 40..60 again from checkpoint 40 give the undisturbed parameters, bit for bit.
    assert_eq!(&final_digest(&out, "rec", &[]), want);
    let v = json_of(&["checkpoint", "verify", "--json", &ckpt], &[]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn a_finished_run_started_again_resumes_after_its_last_step_and_reports_its_loss() {
    let _serial = serial();
    let (reference_out, want) = reference();
    let out = fresh("finished-again");
    copy_dir(reference_out, &out);
    let log = out.with_extension("log");
    let again = Background::start(&run_args(&out, &recipe("rec"), &[]), &[], &log);
    let (code, text) = again.wait(LIMIT);
    assert_eq!(code, 0, "{text}");
    let records = common::records(&log);
    let resumed = find(&records, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    assert_eq!(resumed[0]["step"], STEPS, "no step left to take");
    // No step ran, yet the report gives the loss the run ended with: the checkpoint's.
    let (first, second) = (report(reference_out), report(&out));
    assert!(first["final_loss"].as_f64().is_some(), "{first}");
    assert_eq!(second["final_loss"], first["final_loss"]);
    assert_eq!(second["steps"], STEPS);
    assert_eq!(&final_digest(&out, "rec", &[]), want);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
