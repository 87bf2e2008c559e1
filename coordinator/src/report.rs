//! `report.json` (schema in DESIGN.md; fields are added, never renamed) and `report.md`.

use crate::heuristic::{class_stats, Decision};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use xkd_config::Config;
use xkd_protocol::{ClipOutcome, TrainSummary};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run_id: String,
    pub direction: String,
    pub teacher_modality: String,
    pub student_modality: String,
    pub workers: usize,
    pub steps: u64,
    pub wall_seconds: f64,
    pub hard_classes: Vec<String>,
    pub teacher: Accuracy,
    pub student: BeforeAfter,
    /// Teacher accuracy minus student accuracy (before distillation), per class.
    pub sensory_gap: BTreeMap<String, f64>,
    pub alpha: f64,
    pub temperature: f64,
    pub final_loss: f64,
    pub student_digest: String,
    pub config_digest: String,
    pub final_checkpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accuracy {
    pub overall: f64,
    pub per_class: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Split {
    pub overall: f64,
    pub hard: f64,
    pub other: f64,
    pub per_class: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeforeAfter {
    pub before: Split,
    pub after: Split,
}

pub struct Inputs<'a> {
    pub run_id: &'a str,
    pub config: &'a Config,
    pub workers: usize,
    pub classes: &'a [String],
    pub decision: &'a Decision,
    pub teacher: &'a [ClipOutcome],
    pub before: &'a [ClipOutcome],
    pub after: &'a [ClipOutcome],
    pub distill: &'a TrainSummary,
    /// URL of the last committed checkpoint of the distillation, if any committed.
    pub final_checkpoint: Option<String>,
    pub wall_seconds: f64,
}

fn per_class(outcomes: &[ClipOutcome], classes: &[String]) -> BTreeMap<String, f64> {
    class_stats(outcomes, classes.len())
        .iter()
        .zip(classes)
        .map(|(s, c)| (c.clone(), s.accuracy))
        .collect()
}

fn overall(outcomes: &[ClipOutcome], keep: impl Fn(u32) -> bool) -> f64 {
    let kept: Vec<&ClipOutcome> = outcomes.iter().filter(|o| keep(o.label)).collect();
    let right = kept.iter().filter(|o| o.predicted == o.label).count();
    right as f64 / kept.len().max(1) as f64
}

fn split(outcomes: &[ClipOutcome], classes: &[String], hard: &[u32]) -> Split {
    Split {
        overall: overall(outcomes, |_| true),
        hard: overall(outcomes, |l| hard.contains(&l)),
        other: overall(outcomes, |l| !hard.contains(&l)),
        per_class: per_class(outcomes, classes),
    }
}

pub fn build(i: Inputs) -> Report {
    let hard = i.decision.hard_labels();
    let teacher = Accuracy {
        overall: overall(i.teacher, |_| true),
        per_class: per_class(i.teacher, i.classes),
    };
    let before = split(i.before, i.classes, &hard);
    let sensory_gap = teacher
        .per_class
        .iter()
        .map(|(c, t)| (c.clone(), t - before.per_class[c]))
        .collect();
    Report {
        run_id: i.run_id.to_string(),
        direction: i.config.distill.direction.as_str().to_string(),
        teacher_modality: i.config.teacher_modality().as_str().to_string(),
        student_modality: i.config.student_modality().as_str().to_string(),
        workers: i.workers,
        steps: i.distill.steps,
        wall_seconds: i.wall_seconds,
        hard_classes: i.decision.hard_names(),
        teacher,
        student: BeforeAfter {
            before,
            after: split(i.after, i.classes, &hard),
        },
        sensory_gap,
        alpha: i.config.distill.alpha,
        temperature: i.config.distill.temperature,
        final_loss: i.distill.final_loss,
        student_digest: i.distill.digest.clone(),
        config_digest: i.config.digest(),
        final_checkpoint: i.final_checkpoint,
    }
}

pub fn write(out_dir: &Path, report: &Report) -> Result<()> {
    let json = out_dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out_dir.join("report.md");
    std::fs::write(&md, markdown(report)).with_context(|| format!("writing {}", md.display()))
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

pub fn markdown(r: &Report) -> String {
    let (b, a) = (&r.student.before, &r.student.after);
    let mut s = format!(
        "# xkd run {}\n\n{} teacher -> {} student, {} workers, {} distillation steps, {:.0} s.\n\n\
         | student accuracy (%) | before | after | change |\n|---|---:|---:|---:|\n\
         | hard classes ({}) | {} | {} | {:+.1} |\n| other classes | {} | {} | {:+.1} |\n\
         | all classes | {} | {} | {:+.1} |\n\nTeacher accuracy on its own modality: {}%.\n\n\
         | class | hard | teacher | student before | student after | sensory gap |\n\
         |---|:---:|---:|---:|---:|---:|\n",
        r.run_id,
        r.teacher_modality,
        r.student_modality,
        r.workers,
        r.steps,
        r.wall_seconds,
        r.hard_classes.len(),
        pct(b.hard),
        pct(a.hard),
        100.0 * (a.hard - b.hard),
        pct(b.other),
        pct(a.other),
        100.0 * (a.other - b.other),
        pct(b.overall),
        pct(a.overall),
        100.0 * (a.overall - b.overall),
        pct(r.teacher.overall),
    );
    for (class, t) in &r.teacher.per_class {
        let hard = if r.hard_classes.contains(class) {
            "yes"
        } else {
            ""
        };
        s += &format!(
            "| {class} | {hard} | {} | {} | {} | {:+.1} |\n",
            pct(*t),
            pct(b.per_class[class]),
            pct(a.per_class[class]),
            100.0 * r.sensory_gap[class]
        );
    }
    s
}
