//! `xkd plan` against what a run measures: each worker logs its own peak resident memory per
//! task (`memory`, `peak_rss_mib`: VmHWM, reset as the task starts), and the plan's peak must
//! be within 20% of the largest of them. Two pairs on the CPU:
//!
//! - the embedded default's tiny stand-ins (its memory is mostly the process itself), with a
//!   short pretraining and no feature cache (a cache holds what the run happened to read; the
//!   plan counts its bound);
//! - a random-weight Qwen2-Audio student (84 M parameters, most of them Qwen2's 151,936-token
//!   embeddings and head) taught by a random Qwen2-VL (44 M) through LoRA on all seven
//!   projections, with replay rows: 6-second clips, 228 tokens a question; made by
//!   tests/gpu/make_random_qwen2.py --cpu with the Python standard library alone.
//!
//! The Qwen2 pair is checked twice: as the config has it, and with twice the batch taken by the
//! student one clip at a time (`distill.micro_batch = 1`).
//!
//! Plan and measurement are printed for the log.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn xkd(args: &[&str], sets: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xkd"));
    cmd.current_dir(root()).args(args);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd
}

/// The plan's peak, bytes, and the table for the log.
fn planned(config: &[&str], sets: &[String]) -> (u64, String) {
    let out = xkd(&[&["plan", "--json"], config].concat(), sets)
        .output()
        .expect("xkd plan starts");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = xkd(&[&["plan"], config].concat(), sets).output().unwrap();
    (
        plan["peak_bytes"].as_u64().unwrap(),
        String::from_utf8_lossy(&table.stdout).into_owned(),
    )
}

/// The largest `peak_rss_mib` any worker logged, bytes.
fn measured(out: &Path) -> u64 {
    let mut peak = 0;
    for entry in std::fs::read_dir(out.join("logs")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines().filter(|l| l.contains(" memory ")) {
            let mib: u64 = line
                .split("peak_rss_mib=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a memory line without its peak: {line}"));
            peak = peak.max(mib << 20);
        }
    }
    assert!(peak > 0, "no worker logged its memory in {}", out.display());
    peak
}

/// One run at a time: the two runs' workers would otherwise share the two cores.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(name: &str, config: &[&str], sets: &[String]) {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().unwrap();
    let (plan, table) = planned(config, sets);
    let mut run = xkd(&[&["run"], config].concat(), sets);
    let status = run.arg("--out").arg(out.path()).status().unwrap();
    assert!(status.success(), "{name}: xkd run failed: {status}");
    let peak = measured(out.path());
    let ratio = plan as f64 / peak as f64;
    println!(
        "{name}: plan {:.0} MiB, measured peak RSS {:.0} MiB (plan / measured = {ratio:.2})\n{table}",
        plan as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{name}: the plan ({plan} bytes) is not within 20% of the measured peak ({peak} bytes)"
    );
}

fn cache(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    format!("run.cache_dir=\"{}\"", dir.display())
}

/// Ignored by default: the stand-ins' memory is almost all the process's own, which the
/// allocator makes vary with the machine's load (a worker peaked at 131 to 134 MiB on an idle
/// VM, 186 to 225 MiB beside three compilers), so on a shared CI machine it would fail by
/// chance. Run it alone: `cargo test --release --test plan -- --ignored`.
#[test]
#[ignore]
fn the_plan_of_the_tiny_stand_ins_is_within_20_percent_of_their_peak_rss() {
    let sets = [
        cache("plan-standin-cache"),
        "run.feature_cache_mb=0".into(),
        "pretrain.steps=20".into(),
        "distill.steps=20".into(),
        // Twenty pretraining steps teach the stand-ins little: take the classes outright.
        "heuristic.top_k=4".into(),
        "heuristic.teacher_floor=0.0".into(),
    ];
    check("tiny stand-ins", &[], &sets);
}

/// The random Qwen2 pair's directory and config, made once (the tests share them).
fn random_pair() -> (PathBuf, PathBuf) {
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let models = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plan-random-qwen2");
    let made = models.join("qwen2-vl/model.safetensors");
    if !made.exists() {
        let status = Command::new("python3")
            .arg(root().join("tests/gpu/make_random_qwen2.py"))
            .arg(&models)
            .arg("--cpu")
            .status()
            .expect("python3 runs");
        assert!(status.success(), "make_random_qwen2.py --cpu failed");
    }
    // Written only when it differs: the tests run side by side, and rewriting the file while
    // another test's `xkd plan` reads it once gave that plan an empty config (the stand-ins').
    let config = models.join("plan.toml");
    if std::fs::read_to_string(&config).ok().as_deref() != Some(PAIR) {
        std::fs::write(&config, PAIR).unwrap();
    }
    (models, config)
}

fn random_pair_check(name: &str, extra: &[&str]) {
    let (models, config) = random_pair();
    let dir = |m: &str| models.join(m).display().to_string();
    let mut sets = vec![
        cache("plan-qwen2-cache"),
        format!("audio_model.dir=\"{}\"", dir("qwen2-audio")),
        format!("visual_model.dir=\"{}\"", dir("qwen2-vl")),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    check(name, &["--config", config.to_str().unwrap()], &sets);
}

#[test]
fn the_plan_of_a_random_qwen2_pair_is_within_20_percent_of_its_peak_rss() {
    random_pair_check("random Qwen2 pair", &[]);
}

/// Twice the batch (4 + 4 rows a worker), the student taking one clip at a time: the
/// distillation step is the peak, and the plan counts one clip's activations, not eight.
#[test]
fn the_plan_of_micro_batches_is_within_20_percent_of_their_peak_rss() {
    random_pair_check(
        "random Qwen2 pair, 8 rows a worker, one at a time",
        &["distill.batch=16", "distill.micro_batch=1"],
    );
}

/// Both families through LoRA, replay rows anchored to the student's base, few clips (every
/// model task runs on all of them), three steps.
const PAIR: &str = r#"
[run]
feature_cache_mb = 0

[data]
clip_seconds = 6.0
pretrain_clips = 1
pretrain_scarce_clips = 1
probe_clips = 1
distill_clips = 4
eval_clips = 1

[audio_model]
family = "qwen2"

[visual_model]
family = "qwen2"

[heuristic]
top_k = 3
teacher_floor = 0.0

[distill]
alpha = 1.0
caption_weight = 0.0
replay_fraction = 0.5
replay_target = "student"
# The teacher in the distilling worker, as the README's table was measured: the distillation
# step is then every run's peak. (`auto` would cache it: the cached step, 747 MiB planned at
# 4 + 4 rows one at a time, measured 888-949 MiB here; see README.)
teacher = "online"
steps = 3
batch = 8
lr = 1e-2
warmup_steps = 1

[lora]
r = 8
alpha = 16.0
dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[checkpoint]
every_steps = 0
"#;
