//! `<store>/<run_id>/run/decisions.json`: what a run decides before it distills (the hard
//! classes, the classes the teacher teaches, the teacher's and the untrained student's
//! evaluations), stored once so that the run started again with the same run id reuses it
//! instead of probing again. A borderline class then cannot flip between starts (which would
//! make the checkpoints refuse the resume), and the probe and the first evaluations, a real
//! cost on real models, run once per run.
//!
//! The object is one JSON document, `{"format_version":1,"sha256":"<hex>","decisions":{...}}`,
//! whose sha256 covers the `decisions` value's bytes exactly as written (re-serialising parsed
//! floats would not reproduce them). An object in another layout or version, or whose
//! decisions do not hash to its sha256 (a damaged or hand-edited object), is an error naming
//! its URL: never used, and never silently replaced, since deciding again could flip a class
//! under the run's checkpoints. Deleting the object makes the next start decide again.
//! Floats come back bit for bit (serde_json's `float_roundtrip`), so a resumed run's report
//! says what the first start's would have.

use crate::checkpoint::Checkpoints;
use crate::heuristic::Decision;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use xkd_checkpoint::sha256_hex;
use xkd_protocol::ClipOutcome;

/// Name of the run-level object.
pub const DECISIONS: &str = "decisions.json";
/// Version of its layout; a reader refuses versions it does not know.
pub const DECISIONS_FORMAT: u32 = 1;

/// Everything the stages after the probe take from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDecisions {
    /// `checkpoint::recipe_digest` of the config that decided: another recipe refuses them.
    pub recipe_digest: String,
    /// The heuristic's decision, as `hard_classes.json` holds it.
    pub decision: Decision,
    /// The classes distillation runs on (`distill.classes`), by name, in label order.
    pub taught: Vec<String>,
    /// The teacher on the `eval` split, per clip.
    pub teacher: Vec<ClipOutcome>,
    /// The student on the `eval` split before distillation, per clip.
    pub before: Vec<ClipOutcome>,
}

/// What the object's envelope says before the decisions are trusted.
#[derive(Deserialize)]
struct Envelope {
    format_version: u32,
    sha256: String,
}

const TAIL: &[u8] = b"}\n";

fn head(sha256: &str) -> String {
    format!("{{\"format_version\":{DECISIONS_FORMAT},\"sha256\":\"{sha256}\",\"decisions\":")
}

impl RunDecisions {
    /// The object's bytes: the envelope around the pretty-printed decisions.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("decisions always serialize");
        let mut out = head(&sha256_hex(&body)).into_bytes();
        out.extend_from_slice(&body);
        out.extend_from_slice(TAIL);
        out
    }

    /// The decisions in `bytes`, read from `url`, once version and sha256 check out.
    pub fn from_bytes(bytes: &[u8], url: &str) -> Result<RunDecisions> {
        let envelope: Envelope = serde_json::from_slice(bytes)
            .with_context(|| format!("{url} is not a decisions object"))?;
        if envelope.format_version != DECISIONS_FORMAT {
            bail!(
                "{url} has format version {}; this xkd reads {DECISIONS_FORMAT}",
                envelope.format_version
            );
        }
        let head = head(&envelope.sha256);
        let body = bytes
            .strip_prefix(head.as_bytes())
            .and_then(|rest| rest.strip_suffix(TAIL))
            .ok_or_else(|| anyhow!("{url} is not laid out as xkd writes it"))?;
        let found = sha256_hex(body);
        if found != envelope.sha256 {
            bail!(
                "{url} is damaged: its decisions hash to {found}, it records {}",
                envelope.sha256
            );
        }
        serde_json::from_slice(body).with_context(|| format!("reading the decisions in {url}"))
    }

    /// The taught classes as labels of `classes` (the dataset's class names).
    pub fn taught_labels(&self, classes: &[String]) -> Result<Vec<u32>> {
        labels(&self.taught, classes, "taught")
    }

    /// The heuristic's hard classes as labels of `classes`.
    pub fn hard_labels(&self, classes: &[String]) -> Result<Vec<u32>> {
        labels(&self.decision.hard_names(), classes, "hard")
    }
}

/// The run's stored decisions and their URL, or `None` when none are stored. Decisions of
/// another recipe, or an object that does not read back whole, are an error.
pub async fn load(
    checkpoints: &Checkpoints,
    recipe: &str,
) -> Result<Option<(RunDecisions, String)>> {
    let url = checkpoints.run_object_url(DECISIONS);
    let Some(bytes) = checkpoints.get_run_object(DECISIONS).await? else {
        return Ok(None);
    };
    let stored = RunDecisions::from_bytes(&bytes, &url)?;
    if stored.recipe_digest != recipe {
        bail!(
            "{url} holds the decisions of another recipe (digest {}, this run {recipe}): \
             resuming would distill on another recipe's classes; use a new run.run_id",
            stored.recipe_digest
        );
    }
    Ok(Some((stored, url)))
}

/// Puts `decisions` into the run's store and returns their URL. They are checked to read
/// back first, so a stored object never stops the run's next start.
pub async fn store(checkpoints: &Checkpoints, decisions: &RunDecisions) -> Result<String> {
    let url = checkpoints.run_object_url(DECISIONS);
    let bytes = decisions.to_bytes();
    RunDecisions::from_bytes(&bytes, &url)
        .context("the run's decisions do not read back (a non-finite evaluation?)")?;
    checkpoints
        .put_run_object(DECISIONS, bytes.into())
        .await
        .context("storing the run's decisions")?;
    Ok(url)
}

/// `names` as labels of `classes`; a name the dataset lacks is an error naming it and `what`.
fn labels(names: &[String], classes: &[String], what: &str) -> Result<Vec<u32>> {
    names
        .iter()
        .map(|name| {
            classes
                .iter()
                .position(|c| c == name)
                .map(|l| l as u32)
                .ok_or_else(|| anyhow!("the stored {what} class {name:?} is not in the dataset"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heuristic::ClassRow;

    fn outcome(clip: u32, label: u32) -> ClipOutcome {
        ClipOutcome {
            clip,
            label,
            predicted: 1,
            p_true: 0.1 + 0.2, // 17 significant digits
            entropy: std::f64::consts::LN_10 / 3.0,
        }
    }

    fn decisions(recipe: &str) -> RunDecisions {
        let row = |label: u32, class: &str, hard| ClassRow {
            class: class.into(),
            label,
            student_accuracy: 0.25,
            student_p_true: 1.0 / 3.0,
            student_entropy: 0.9,
            teacher_accuracy: 1.0,
            prior: 0.5,
            score: 0.7,
            hard,
            reason: "student predicted to fail; teacher clears the floor".into(),
        };
        RunDecisions {
            recipe_digest: recipe.into(),
            decision: Decision {
                coefficients: vec![1.0, -2.5, 0.125],
                fitted: false,
                classes: vec![row(0, "owl", true), row(1, "kettle", false)],
            },
            taught: vec!["owl".into()],
            teacher: vec![outcome(3, 0), outcome(4, 1)],
            before: vec![outcome(3, 0), outcome(4, 1)],
        }
    }

    /// A file store under a temporary directory, for run `t`.
    fn checkpoints(dir: &std::path::Path) -> Checkpoints {
        Checkpoints::open(&xkd_config::Config::embedded(), "t", dir).unwrap()
    }

    #[tokio::test]
    async fn decisions_go_through_the_store_and_come_back_for_their_recipe_only() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = checkpoints(dir.path());
        assert!(load(&ckpts, "r1").await.unwrap().is_none());
        let url = store(&ckpts, &decisions("r1")).await.unwrap();
        assert!(
            url.starts_with("file://") && url.ends_with("/checkpoints/t/run/decisions.json"),
            "{url}"
        );
        let (back, at) = load(&ckpts, "r1").await.unwrap().expect("stored");
        assert_eq!((back, at), (decisions("r1"), url.clone()));
        let e = format!("{:#}", load(&ckpts, "r2").await.unwrap_err());
        assert!(e.contains("another recipe") && e.contains(&url), "{e}");
    }

    #[tokio::test]
    async fn a_damaged_object_is_refused_naming_its_url() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = checkpoints(dir.path());
        let url = store(&ckpts, &decisions("r1")).await.unwrap();
        let file = dir.path().join("checkpoints/t/run/decisions.json");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replacen("\"kettle\"", "\"kettla\"", 1)).unwrap();
        let e = format!("{:#}", load(&ckpts, "r1").await.unwrap_err());
        assert!(e.contains("damaged") && e.contains(&url), "{e}");

        let bytes = decisions("r1").to_bytes();
        for cut in [bytes.len() / 2, bytes.len() - 1] {
            let e = RunDecisions::from_bytes(&bytes[..cut], "u").unwrap_err();
            assert!(format!("{e:#}").starts_with("u "), "{e:#}");
        }
        let other = String::from_utf8(bytes).unwrap().replacen(":1,", ":2,", 1);
        let e = RunDecisions::from_bytes(other.as_bytes(), "u").unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
    }

    #[test]
    fn taught_classes_map_back_to_the_datasets_labels() {
        let d = decisions("r");
        let classes = ["kettle".to_string(), "owl".to_string()];
        assert_eq!(d.taught_labels(&classes).unwrap(), [1]);
        assert!(d.taught_labels(&classes[..1]).is_err());
    }
}
