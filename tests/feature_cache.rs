//! `run.feature_cache_mb` bounds what a worker keeps of clips' features (issue 13, item 3); it
//! is memory, not recipe: a run that keeps nothing beyond the batch in hand recomputes
//! features on every use and ends with the same student, bit for bit, as one that keeps all.

mod common;

use common::{fresh_dir, report, run_args, small_recipe, xkd};
use std::path::PathBuf;

#[test]
fn a_run_keeping_no_features_trains_the_same_student_as_one_keeping_all() {
    let base = fresh_dir(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")), "feature-cache");
    let run = |name: &str, cache_mb: u64| {
        let mut sets = small_recipe(&base.join("cache"), name, 12, 0, 1);
        sets.push(format!("run.feature_cache_mb={cache_mb}"));
        let out = base.join(name);
        let (code, _, stderr) = xkd(&run_args(&out, &sets, &[]), &[]);
        assert_eq!(code, 0, "xkd run ({name}) failed:\n{stderr}");
        report(&out)
    };
    let all = run("keep-all", 2048);
    let none = run("keep-none", 0);
    assert_eq!(all["student_digest"], none["student_digest"]);
    assert_eq!(all["student"], none["student"]);
}
