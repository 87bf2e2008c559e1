//! `xkd eval --checkpoint URL` (issue 17, item 4): the student of a run's final checkpoint,
//! evaluated on its own, has the accuracies the run's report gives after distillation, class
//! by class; an earlier checkpoint of the same run evaluates too, and a URL that names no run
//! is refused before anything starts.

mod common;

use common::{fresh_dir, report, run_args, small_recipe, xkd};
use serde_json::Value;
use std::path::PathBuf;

fn eval(sets: &[String], checkpoint: &str, out: &std::path::Path) -> Value {
    let mut args = vec![
        "eval".to_string(),
        "--json".into(),
        "--checkpoint".into(),
        checkpoint.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    for set in sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    let (code, stdout, stderr) = xkd(&args, &[]);
    assert_eq!(code, 0, "xkd eval failed:\n{stderr}");
    let printed: Value = serde_json::from_str(&stdout).expect("xkd eval --json prints JSON");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(printed, written, "eval.json is what was printed");
    printed
}

#[test]
fn eval_of_the_final_checkpoint_reproduces_the_reports_after_accuracies() {
    let base = fresh_dir(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")), "eval");
    // Enough pretraining, eval clips and distillation that the student's answers change.
    let mut sets = small_recipe(&base.join("cache"), "evaluated", 12, 6, 2);
    sets.extend(["pretrain.steps=150".into(), "data.eval_clips=6".into()]);
    sets.extend(["data.pretrain_clips=12".into(), "distill.lr=0.01".into()]);
    let run_out = base.join("run");
    let (code, _, stderr) = xkd(&run_args(&run_out, &sets, &[]), &[]);
    assert_eq!(code, 0, "xkd run failed:\n{stderr}");
    let report = report(&run_out);
    let last = report["final_checkpoint"].as_str().unwrap().to_string();
    assert!(last.ends_with("/ckpt/0000000012"), "{last}");

    let e = eval(&sets, &last, &base.join("eval-final"));
    let after = &report["student"]["after"];
    // Distillation changed the student's answers, so matching `after` singles out its result.
    assert_ne!(after["per_class"], report["student"]["before"]["per_class"]);
    let named = e["checkpoint"].as_str().unwrap();
    assert!(named.ends_with("/evaluated/ckpt/0000000012"), "{named}");
    assert_eq!(e["step"], 12);
    assert_eq!(e["per_class"], after["per_class"], "per-class accuracies");
    for key in ["overall", "hard", "other"] {
        assert_eq!(e[key], after[key], "{key}");
    }
    assert_eq!(e["hard_classes"], report["hard_classes"]);

    // The run's URL means its newest checkpoint; an earlier one is named by its step.
    let run_url = last.trim_end_matches("/ckpt/0000000012");
    let newest = eval(&sets, run_url, &base.join("eval-run"));
    assert_eq!(newest["step"], 12);
    assert_eq!(newest["per_class"], e["per_class"]);
    let earlier = eval(
        &sets,
        &format!("{run_url}/ckpt/0000000006"),
        &base.join("eval-6"),
    );
    assert_eq!(earlier["step"], 6);
    assert!(earlier["overall"].as_f64().unwrap() >= 0.0);

    // A URL with a step that is not ten digits names no checkpoint: exit 2, named.
    let bad = format!("{run_url}/ckpt/12");
    let mut args = vec!["eval".to_string(), "--checkpoint".into(), bad.clone()];
    for set in &sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    let (code, _, stderr) = xkd(&args, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("12"), "{stderr}");
}
