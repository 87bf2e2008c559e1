//! `report.json` (schema in DESIGN.md; fields are added, never renamed) and `report.md`.

use crate::heuristic::{class_stats, Decision};
use crate::pictures;
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
    /// `distill.classes`, and the classes the teacher taught by it (the hard ones by default).
    pub distilled_on: String,
    pub taught_classes: Vec<String>,
    /// Synthetic sets only: the heuristic's pick against the classes the generator made subtle
    /// for the student (read here for the report, never by the pipeline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heuristic_vs_construction: Option<HeuristicCheck>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeuristicCheck {
    /// The classes built subtle in the student's modality.
    pub built_hard: Vec<String>,
    /// Share of the picked classes that were built subtle (1 when nothing was picked).
    pub precision: f64,
    /// Share of the built-subtle classes that were picked.
    pub recall: f64,
}

impl HeuristicCheck {
    pub fn new(picked: &[String], built_hard: Vec<String>) -> HeuristicCheck {
        let hits = picked.iter().filter(|c| built_hard.contains(c)).count() as f64;
        let share = |n: usize| if n == 0 { 1.0 } else { hits / n as f64 };
        HeuristicCheck {
            precision: share(picked.len()),
            recall: share(built_hard.len()),
            built_hard,
        }
    }
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
    pub taught: &'a [String],
    pub heuristic_check: Option<HeuristicCheck>,
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

/// What `xkd eval` finds: the accuracy of one checkpoint's student on the eval split, as
/// `report.json`'s `student.after` gives it for the run's final one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub checkpoint: String,
    pub step: u64,
    pub student_modality: String,
    /// The hard classes the checkpoint's run decided, when its store holds them.
    pub hard_classes: Option<Vec<String>>,
    pub overall: f64,
    /// Over the hard classes and over the others; absent without the run's decisions.
    pub hard: Option<f64>,
    pub other: Option<f64>,
    pub per_class: BTreeMap<String, f64>,
    pub clips: usize,
}

pub fn evaluation(
    checkpoint: &str,
    step: u64,
    config: &Config,
    classes: &[String],
    hard_classes: Option<Vec<String>>,
    outcomes: &[ClipOutcome],
) -> Evaluation {
    let hard: Option<Vec<u32>> = hard_classes.as_ref().map(|names| {
        (0..classes.len() as u32)
            .filter(|&l| names.contains(&classes[l as usize]))
            .collect()
    });
    Evaluation {
        checkpoint: checkpoint.to_string(),
        step,
        student_modality: config.student_modality().as_str().to_string(),
        overall: overall(outcomes, |_| true),
        hard: hard.as_ref().map(|h| overall(outcomes, |l| h.contains(&l))),
        other: hard
            .as_ref()
            .map(|h| overall(outcomes, |l| !h.contains(&l))),
        per_class: per_class(outcomes, classes),
        hard_classes,
        clips: outcomes.len(),
    }
}

/// `xkd eval`'s table for people.
pub fn evaluation_markdown(e: &Evaluation) -> String {
    let mut s = format!(
        "# {} student of {}\n\nstep {}, {} eval clips: accuracy {:.3}",
        e.student_modality, e.checkpoint, e.step, e.clips, e.overall
    );
    if let (Some(h), Some(o)) = (e.hard, e.other) {
        s += &format!(", hard classes {h:.3}, other classes {o:.3}");
    }
    s += "\n\n| class | hard | accuracy |\n|---|---|---:|\n";
    for (class, acc) in &e.per_class {
        let hard = match &e.hard_classes {
            Some(h) if h.contains(class) => "yes",
            Some(_) => "",
            None => "?",
        };
        s += &format!("| {class} | {hard} | {acc:.3} |\n");
    }
    s
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
        distilled_on: i.config.distill.classes.as_str().to_string(),
        taught_classes: i.taught.to_vec(),
        heuristic_vs_construction: i.heuristic_check,
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

/// `report.json`, then the pictures (`pictures.rs`), then `report.md` linking those drawn. A
/// picture that fails is logged and named in `report.md`, never fails the run: the numbers it
/// shows are in the two report files, which are written whatever happens to it.
pub fn write(out_dir: &Path, report: &Report) -> Result<()> {
    let json = out_dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let drawn = pictures::write(out_dir, report);
    let md = out_dir.join("report.md");
    let text = summary(report) + &picture_links(&drawn) + &class_table(report);
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))
}

/// `report.md`'s links to the pictures, or why one is missing.
fn picture_links(drawn: &[pictures::Drawn]) -> String {
    let mut s = String::new();
    for d in drawn {
        s += &match &d.error {
            None => format!("![{}]({})\n\n", d.title, d.file),
            Some(e) => format!("{} (`{}`) was not drawn: {e}\n\n", d.title, d.file),
        };
    }
    s
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// Which classes the teacher taught, in words.
fn taught_line(r: &Report) -> String {
    match r.distilled_on.as_str() {
        "hard" => "Distilled on the hard classes.\n\n".to_string(),
        "all" => format!(
            "Distilled on all {} classes (`distill.classes = \"all\"`).\n\n",
            r.taught_classes.len()
        ),
        other => format!(
            "Distilled on {} classes drawn at random (`distill.classes = \"{other}\"`): {}.\n\n",
            r.taught_classes.len(),
            r.taught_classes.join("; ")
        ),
    }
}

/// The report for people, as `xkd run` prints it (`report.md` adds the pictures' links).
pub fn markdown(r: &Report) -> String {
    summary(r) + &class_table(r)
}

/// Accuracy before and after, which classes were taught, the heuristic's check.
fn summary(r: &Report) -> String {
    let (b, a) = (&r.student.before, &r.student.after);
    let mut s = format!(
        "# xkd run {}\n\n{} teacher -> {} student, {} workers, {} distillation steps, {:.0} s.\n\n\
         | student accuracy (%) | before | after | change |\n|---|---:|---:|---:|\n\
         | hard classes ({}) | {} | {} | {:+.1} |\n| other classes | {} | {} | {:+.1} |\n\
         | all classes | {} | {} | {:+.1} |\n\nTeacher accuracy on its own modality: {}%.\n\n",
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
    s += &taught_line(r);
    if let Some(h) = &r.heuristic_vs_construction {
        s += &format!(
            "The heuristic against the synthetic set's construction: precision {:.2}, recall \
             {:.2} (built subtle for the student: {}).\n\n",
            h.precision,
            h.recall,
            h.built_hard.join("; ")
        );
    }
    s
}

/// One row per class: teacher, student before and after, the sensory gap before.
fn class_table(r: &Report) -> String {
    let (b, a) = (&r.student.before, &r.student.after);
    let mut s = String::new();
    s += "| class | hard | teacher | student before | student after | sensory gap |\n\
          |---|:---:|---:|---:|---:|---:|\n";
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

/// `xkd compare`'s table: one row per run of the same recipe with another `distill.classes`.
/// "Hard" and "other" are the heuristic's split in every row, so the rows compare the same
/// classes; the runs must agree on it.
pub fn comparison(runs: &[Report]) -> Result<String> {
    let first = runs.first().context("no run to compare")?;
    for r in runs {
        if r.hard_classes != first.hard_classes {
            anyhow::bail!(
                "the `{}` run picked the hard classes {:?}, the `{}` run {:?}: the runs are not \
                 comparable",
                r.distilled_on,
                r.hard_classes,
                first.distilled_on,
                first.hard_classes
            );
        }
    }
    // Class names may hold commas ("heart sounds, heartbeat"): lists are joined with "; ".
    let mut s = format!(
        "# xkd compare: {} teacher -> {} student, {} distillation steps\n\n\
         Student accuracy (%) on the eval split. Hard: the {} classes the heuristic picked ({}); \
         other: the rest.\n\n\
         | distilled on | classes | hard before | hard after | other before | other after | \
         all before | all after |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        first.teacher_modality,
        first.student_modality,
        first.steps,
        first.hard_classes.len(),
        first.hard_classes.join("; "),
    );
    for r in runs {
        let (b, a) = (&r.student.before, &r.student.after);
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.distilled_on,
            r.taught_classes.len(),
            pct(b.hard),
            pct(a.hard),
            pct(b.other),
            pct(a.other),
            pct(b.overall),
            pct(a.overall)
        );
    }
    for r in runs.iter().filter(|r| r.distilled_on == "random") {
        s += &format!("\nThe random draw: {}.\n", r.taught_classes.join("; "));
    }
    Ok(s)
}
