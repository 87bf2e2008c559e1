//! The hard-class heuristic: per-class features of student and teacher on the probe split, a
//! logistic model of the student's error, and the decision with its reasons.
//!
//! Features, in coefficient order after the bias: student accuracy, student mean p(true
//! option), student mean entropy over the options (divided by ln 10, so in [0, 1]), teacher
//! accuracy, and a human prior that the student's modality perceives the class. The default
//! coefficients (configs/default.toml) make a class whose student accuracy is under about 0.45,
//! with matching confidence, score above 0.5; the teacher enters through `teacher_floor`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use xkd_config::HeuristicConfig;
use xkd_protocol::ClipOutcome;

pub const FEATURES: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRow {
    pub class: String,
    pub label: u32,
    pub student_accuracy: f64,
    pub student_p_true: f64,
    pub student_entropy: f64,
    pub teacher_accuracy: f64,
    pub prior: f64,
    pub score: f64,
    pub hard: bool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub coefficients: Vec<f64>,
    pub fitted: bool,
    pub classes: Vec<ClassRow>,
}

impl Decision {
    pub fn hard_labels(&self) -> Vec<u32> {
        self.classes
            .iter()
            .filter(|r| r.hard)
            .map(|r| r.label)
            .collect()
    }

    pub fn hard_names(&self) -> Vec<String> {
        self.classes
            .iter()
            .filter(|r| r.hard)
            .map(|r| r.class.clone())
            .collect()
    }
}

/// Per-class mean of (correct, p_true, entropy / ln 10) over outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClassStats {
    pub accuracy: f64,
    pub p_true: f64,
    pub entropy: f64,
    pub count: usize,
}

pub fn class_stats(outcomes: &[ClipOutcome], n_classes: usize) -> Vec<ClassStats> {
    let mut sums = vec![ClassStats::default(); n_classes];
    for o in outcomes {
        let s = &mut sums[o.label as usize];
        s.accuracy += (o.predicted == o.label) as u8 as f64;
        s.p_true += o.p_true;
        s.entropy += o.entropy / 10f64.ln();
        s.count += 1;
    }
    for s in &mut sums {
        let n = s.count.max(1) as f64;
        s.accuracy /= n;
        s.p_true /= n;
        s.entropy /= n;
    }
    sums
}

fn features(student: &ClassStats, teacher: &ClassStats, prior: f64) -> [f64; FEATURES] {
    [
        student.accuracy,
        student.p_true,
        student.entropy,
        teacher.accuracy,
        prior,
    ]
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn score(coef: &[f64], x: &[f64; FEATURES]) -> f64 {
    sigmoid(coef[0] + coef[1..].iter().zip(x).map(|(w, v)| w * v).sum::<f64>())
}

/// Decide the hard classes from probe outcomes of both models.
pub fn decide(
    cfg: &HeuristicConfig,
    classes: &[String],
    student: &[ClipOutcome],
    teacher: &[ClipOutcome],
) -> Result<Decision> {
    let n = classes.len();
    let priors = xkd_data::prior::read_priors(&cfg.prior_csv, classes)?;
    let s_stats = class_stats(student, n);
    let t_stats = class_stats(teacher, n);
    let coefficients = if cfg.fit {
        fit(student, &priors, &t_stats, n)?
    } else {
        cfg.coefficients.clone()
    };
    let mut rows: Vec<ClassRow> = (0..n)
        .map(|c| {
            let x = features(&s_stats[c], &t_stats[c], priors[c]);
            ClassRow {
                class: classes[c].clone(),
                label: c as u32,
                student_accuracy: s_stats[c].accuracy,
                student_p_true: s_stats[c].p_true,
                student_entropy: s_stats[c].entropy,
                teacher_accuracy: t_stats[c].accuracy,
                prior: priors[c],
                score: score(&coefficients, &x),
                hard: false,
                reason: String::new(),
            }
        })
        .collect();
    mark_hard(cfg, &mut rows);
    Ok(Decision {
        coefficients,
        fitted: cfg.fit,
        classes: rows,
    })
}

fn mark_hard(cfg: &HeuristicConfig, rows: &mut [ClassRow]) {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| rows[b].score.total_cmp(&rows[a].score).then(a.cmp(&b)));
    let rank_of: HashMap<usize, usize> = order.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        let predicted_hard = if cfg.top_k > 0 {
            rank_of[&i] < cfg.top_k
        } else {
            row.score > cfg.threshold
        };
        let teacher_ok = row.teacher_accuracy >= cfg.teacher_floor;
        row.hard = predicted_hard && teacher_ok;
        row.reason = match (predicted_hard, teacher_ok) {
            (true, true) => "student predicted to fail; teacher clears the floor".into(),
            (true, false) => format!(
                "student predicted to fail, but teacher accuracy {:.2} is under the floor {:.2}",
                row.teacher_accuracy, cfg.teacher_floor
            ),
            (false, _) if cfg.top_k > 0 => format!("not in the top {}", cfg.top_k),
            (false, _) => format!("score {:.3} <= threshold {:.3}", row.score, cfg.threshold),
        };
    }
}

/// Fit the coefficients by logistic regression of per-clip student error on class features.
/// Features come from the even-numbered probe clips and targets from the odd ones, so a class
/// cannot predict its own outcomes perfectly from the very clips it is scored on.
fn fit(
    student: &[ClipOutcome],
    priors: &[f64],
    teacher: &[ClassStats],
    n: usize,
) -> Result<Vec<f64>> {
    let (even, odd): (Vec<ClipOutcome>, Vec<ClipOutcome>) =
        student.iter().cloned().partition(|o| o.clip % 2 == 0);
    if even.is_empty() || odd.is_empty() {
        bail!("heuristic.fit needs at least two probe clips per class");
    }
    let stats = class_stats(&even, n);
    let data: Vec<([f64; FEATURES], f64)> = odd
        .iter()
        .map(|o| {
            let c = o.label as usize;
            let x = features(&stats[c], &teacher[c], priors[c]);
            (x, (o.predicted != o.label) as u8 as f64)
        })
        .collect();
    let mut w = vec![0.0; FEATURES + 1];
    for _ in 0..2000 {
        let mut grad = [0.0; FEATURES + 1];
        for (x, y) in &data {
            let err = score(&w, x) - y;
            grad[0] += err;
            for k in 0..FEATURES {
                grad[k + 1] += err * x[k];
            }
        }
        for k in 0..=FEATURES {
            let l2 = if k == 0 { 0.0 } else { 1e-3 * w[k] };
            w[k] -= 0.5 * (grad[k] / data.len() as f64 + l2);
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HeuristicConfig {
        xkd_config::Config::embedded().heuristic
    }

    /// Outcomes where class c is answered right with probability acc[c].
    fn outcomes(acc: &[f64], per_class: u32) -> Vec<ClipOutcome> {
        let mut out = Vec::new();
        for (c, &a) in acc.iter().enumerate() {
            for k in 0..per_class {
                let right = (k as f64) < a * per_class as f64;
                out.push(ClipOutcome {
                    clip: c as u32 * per_class + k,
                    label: c as u32,
                    predicted: if right {
                        c as u32
                    } else {
                        (c as u32 + 1) % acc.len() as u32
                    },
                    p_true: if right { 0.8 } else { 0.1 },
                    entropy: if right { 0.6 } else { 2.0 },
                });
            }
        }
        out
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class {i}")).collect()
    }

    #[test]
    fn weak_student_and_able_teacher_make_a_hard_class() {
        let student = outcomes(&[0.1, 0.9, 0.2, 1.0, 0.1], 10);
        let teacher = outcomes(&[0.9, 0.9, 0.3, 1.0, 0.9], 10);
        let d = decide(&cfg(), &names(5), &student, &teacher).unwrap();
        // class 2: student weak but the teacher is weak too -> not hard, and it says why.
        assert_eq!(d.hard_labels(), vec![0, 4]);
        assert!(
            d.classes[2].reason.contains("floor"),
            "{}",
            d.classes[2].reason
        );
    }

    #[test]
    fn top_k_takes_the_highest_scores() {
        let student = outcomes(&[0.5, 0.1, 0.3, 1.0], 10);
        let teacher = outcomes(&[1.0; 4], 10);
        let c = HeuristicConfig { top_k: 2, ..cfg() };
        let d = decide(&c, &names(4), &student, &teacher).unwrap();
        assert_eq!(d.hard_labels(), vec![1, 2]);
    }

    #[test]
    fn fitted_coefficients_rank_weak_classes_first() {
        let acc = [0.1, 0.9, 0.2, 1.0, 0.0, 0.8];
        let student = outcomes(&acc, 20);
        let teacher = outcomes(&[1.0; 6], 20);
        let c = HeuristicConfig {
            fit: true,
            top_k: 3,
            ..cfg()
        };
        let d = decide(&c, &names(6), &student, &teacher).unwrap();
        assert!(d.fitted);
        assert_eq!(d.hard_labels(), vec![0, 2, 4]);
    }
}
