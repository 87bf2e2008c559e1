//! What the `xkd` package's integration tests share: running the binary, reading its JSON,
//! and a recipe small enough to train in seconds. Each test file uses part of it.

#![allow(dead_code)]

pub mod netns;
pub mod proxy;
pub mod relay;
#[path = "../../checkpoint/tests/common/s3.rs"]
pub mod s3;

use serde_json::Value;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Runs `xkd args` with `env` added; returns exit status, stdout and stderr.
pub fn xkd<A: AsRef<OsStr>>(args: &[A], env: &[(String, String)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xkd"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("xkd starts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON `xkd args` prints; panics with its stderr if it fails.
pub fn json_of(args: &[&str], env: &[(String, String)]) -> Value {
    let (code, out, err) = xkd(args, env);
    assert_eq!(code, 0, "xkd {args:?} failed:\n{err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("xkd {args:?} printed no JSON ({e}):\n{out}"))
}

/// A recipe small enough for a test: few clips, short pretraining, every class hard (the
/// barely trained teacher clears no accuracy floor otherwise), `steps` distillation steps
/// with a checkpoint every `every`, the newest `keep` kept.
pub fn small_recipe(
    cache: &Path,
    run_id: &str,
    steps: u64,
    every: u64,
    keep: usize,
) -> Vec<String> {
    [
        format!("run.cache_dir=\"{}\"", cache.display()),
        format!("run.run_id={run_id}"),
        "data.pretrain_clips=4".into(),
        "data.pretrain_scarce_clips=1".into(),
        "data.probe_clips=2".into(),
        "data.distill_clips=4".into(),
        "data.eval_clips=2".into(),
        "pretrain.steps=20".into(),
        "heuristic.teacher_floor=0.0".into(),
        format!("distill.steps={steps}"),
        "distill.warmup_steps=5".into(),
        format!("checkpoint.every_steps={every}"),
        format!("checkpoint.keep_last={keep}"),
    ]
    .into()
}

/// `xkd run --out out --set s...` plus `extra` arguments, as arguments.
pub fn run_args(out: &Path, sets: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = command_args(&["run"], out, sets);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `xkd <command...> --out out --set s...`, as arguments.
pub fn command_args(command: &[&str], out: &Path, sets: &[String]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    args.extend(["--out".to_string(), out.display().to_string()]);
    for set in sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    args
}

/// An `xkd run` in the background, logging JSON lines into a file the test can watch.
pub struct Background {
    pub child: Child,
    pub log: PathBuf,
}

impl Background {
    /// Starts `xkd --log-format json <args>` with `env`, its stderr into `log`.
    pub fn start(args: &[String], env: &[(String, String)], log: &Path) -> Background {
        let mut command = Command::new(env!("CARGO_BIN_EXE_xkd"));
        command
            .args(["--log-format", "json"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        Background::spawn(command, log)
    }

    /// Starts `command` (an `xkd --log-format json ...`, however it is launched), its stderr
    /// into `log`.
    pub fn spawn(mut command: Command, log: &Path) -> Background {
        let file = std::fs::File::create(log).expect("log file");
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("xkd starts");
        Background {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The log records so far.
    pub fn records(&self) -> Vec<Value> {
        records(&self.log)
    }

    /// Waits (at most `limit`) for a record `pred` accepts and returns it; panics with the
    /// log if the run exits or the time passes first.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let log = self.log.clone();
        self.wait_until(what, limit, || records(&log).into_iter().find(&pred))
    }

    /// Waits (at most `limit`) until `found` gives something, and returns it; panics with the
    /// log if the run exits or the time passes first.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut found: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(hit) = found() {
                return hit;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("xkd exited ({status}) before {what}:\n{}", self.text());
            }
            assert!(
                start.elapsed() < limit,
                "no {what} within {limit:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until checkpoint `step` is committed and rank 0, started with `hold_env(step, ..)`,
    /// is held after it (its record in `out/logs`). From then until the release no rank
    /// takes another step and no later checkpoint commits, however fast the machine.
    pub fn wait_held(&mut self, out: &Path, step: u64, limit: Duration) {
        self.wait_for(&format!("the checkpoint of step {step}"), limit, |r| {
            is(r, "checkpoint committed", "step", step)
        });
        self.wait_until("rank 0 held", limit, || held(out, step).then_some(()));
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(mut self, limit: Duration) -> (i32, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code().unwrap_or(-1), self.text());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("xkd did not finish within {limit:?}:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON records of a log file (lines that are not JSON are left out).
pub fn records(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The log records whose message is `message`.
pub fn find<'a>(records: &'a [Value], message: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["message"] == message).collect()
}

/// `out/report.json`, which a finished run writes.
pub fn report(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    serde_json::from_str(&text).unwrap()
}

/// The environment that holds rank 0 of a run once it has taken step `step` and uploaded that
/// step's checkpoint, until `release` exists or the rank is told to stop
/// (worker/src/hold.rs). Any stale release file is removed.
pub fn hold_env(step: u64, release: &Path) -> (String, String) {
    let _ = std::fs::remove_file(release);
    (
        "XKD_TEST_HOLD".into(),
        format!("{step}:{}", release.display()),
    )
}

/// Lets a held rank go on.
pub fn release(file: &Path) {
    std::fs::write(file, b"").expect("the release file");
}

/// Whether a worker log under `out/logs` says rank 0 is held after step `step`.
pub fn held(out: &Path, step: u64) -> bool {
    worker_records(out)
        .iter()
        .any(|r| is(r, "held for a test", "step", step))
}

/// The records of every worker log under `out/logs`.
pub fn worker_records(out: &Path) -> Vec<Value> {
    let Ok(dir) = std::fs::read_dir(out.join("logs")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .flat_map(|e| records(&e.path()))
        .collect()
}

/// `kill SIG pid`, which must succeed.
pub fn signal(pid: i64, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// Whether `record` is the log line `message` with field `key` equal to `value`.
pub fn is(record: &Value, message: &str, key: &str, value: u64) -> bool {
    record["message"] == message && record[key].as_u64() == Some(value)
}

/// Seconds since midnight of an RFC 3339 UTC timestamp (`...THH:MM:SS.fffZ`).
pub fn seconds_of_day(ts: &str) -> f64 {
    let time = ts.split('T').nth(1).expect("a time").trim_end_matches('Z');
    time.split(':')
        .map(|p| p.parse::<f64>().expect("a number"))
        .fold(0.0, |acc, p| acc * 60.0 + p)
}

/// One run at a time within a test binary: the runs share a cache of pretrained stand-ins and
/// a 2-core machine.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `root/runs/name`, emptied.
pub fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join("runs").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The steps of the committed checkpoints of the run at `run_url`, newest first
/// (`xkd checkpoint ls`).
pub fn committed_steps(run_url: &str, env: &[(String, String)]) -> Vec<u64> {
    json_of(&["checkpoint", "ls", "--json", run_url], env)
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["step"].as_u64().expect("a step"))
        .collect()
}
