//! The losses of a training step, one flow per objective whatever the models: supervised
//! (pretraining the stand-ins, with the caption loss), and distillation (the teacher on the
//! hard-class rows, the frozen pre-distillation student on the replay rows), through the fused
//! distillation loss of `xkd-kernels`. Every model is asked through `Rank::answers`.
//!
//! A step's gradients come from here: distillation runs the student over the rank's rows
//! `distill.micro_batch` at a time, each micro-batch's loss already divided by the whole step's
//! rows, and adds their gradients, so only one micro-batch's activations are alive at once.
//! Only the trainable parameters' gradients are kept (candle's backward also leaves the frozen
//! weights' in its store).

use super::inputs::{letter_logits, Answers, Ask};
use super::{clock, ms, Anchors, Before, Rank, Teacher, Timings};
use anyhow::{bail, Context as _, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var, D};
use xkd_kernels::{FusedLoss, LossParts};
use xkd_models::model::Vocab;
use xkd_models::net::Net;
use xkd_protocol::{Objective, Sample, TrainTask};

/// What a step's forward and backward passes leave: the summed gradients of the trainable
/// parameters, the loss and its (kl, ce) parts, and where the time went.
pub(super) struct StepGrads {
    pub(super) grads: GradStore,
    pub(super) loss: f64,
    pub(super) parts: (f64, f64),
    pub(super) times: Timings,
}

impl Rank {
    /// The gradients of `vars` from this rank's slice of the `step`-th step (the plans'
    /// cursors), with its loss.
    pub(super) fn gradients(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: Option<&mut Anchors>,
        step: u64,
        vars: &[(String, Var)],
    ) -> Result<StepGrads> {
        match (anchors, student) {
            (Some(anchors), _) => self.distill_grads(task, student, anchors, step, vars),
            (None, Net::StandIn(s)) => {
                let (loss, parts, times) = self.supervised_loss(task, student, &s.vocab, step)?;
                let mut grads = GradStore::default();
                add_grads(&mut grads, loss.backward()?, vars)?;
                Ok(StepGrads {
                    grads,
                    loss: loss.to_scalar::<f32>()? as f64,
                    parts,
                    times,
                })
            }
            (None, Net::Qwen(_)) => bail!("a qwen2 model is only distilled, not pretrained"),
        }
    }

    /// Pretraining a stand-in: cross-entropy on the true letter (a token of the whole
    /// vocabulary), plus the caption's cross-entropy on the class name, weighted.
    fn supervised_loss(
        &mut self,
        task: &TrainTask,
        student: &Net,
        vocab: &Vocab,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        let clips = task.plan.samples(self.rank, self.world, step, task.batch);
        let ask = Ask {
            full_vocab: true,
            caption: true,
        };
        let a = self.answers(student, task.modality, &clips, task.seed, ask)?;
        let letters: Vec<u32> = a
            .answer_idx
            .iter()
            .map(|&i| vocab.letter(i as usize))
            .collect();
        let targets = Tensor::new(letters.as_slice(), &self.device)?;
        let mut loss = candle_nn::loss::cross_entropy(&a.logits, &targets)?;
        if task.caption_weight > 0.0 {
            let caption = a
                .caption
                .as_ref()
                .context("a stand-in answers with a caption")?;
            let names: Vec<u32> = a
                .labels
                .iter()
                .map(|(label, _)| vocab.class_token(*label))
                .collect();
            let names = Tensor::new(names.as_slice(), &self.device)?;
            let caption_loss = candle_nn::loss::cross_entropy(caption, &names)?;
            loss = (loss + (caption_loss * task.caption_weight)?)?;
        }
        let v = loss.to_scalar::<f32>()? as f64;
        let times = Timings {
            tokens: a.tokens,
            ..Timings::default()
        };
        Ok((loss, (0.0, v), times))
    }

    /// Distillation, for any pair of models: the teacher's answers on the hard-class rows and
    /// the frozen pre-distillation student's on the replay rows are the targets of the
    /// student's, over the ten letters (or the whole vocabulary, `kl_over = "vocab"`). Where
    /// every model is a stand-in, each one's caption (its next-token distribution right after
    /// its own modality tokens) is distilled too: it tells the student's encoder which class
    /// it heard directly, not only through the answer letter. A Qwen2 model has no caption
    /// term (the config refuses a caption weight with one). The targets come first, for every
    /// row; then the student runs forward and backward over `micro_batch` rows at a time.
    fn distill_grads(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: &mut Anchors,
        step: u64,
        vars: &[(String, Var)],
    ) -> Result<StepGrads> {
        let Objective::Distill {
            alpha,
            temperature,
            label_free,
            full_vocab,
            caption_weight,
            replay_labels,
            micro_batch,
            ..
        } = task.objective
        else {
            bail!("a distillation loss needs a distillation task");
        };
        // Captions where no model is a Qwen2 one; the teacher cache asks the same
        // (`teacher_cache::teacher_ask`).
        let ask = super::teacher_cache::teacher_ask(self, task)?;
        let clips = task.plan.samples(self.rank, self.world, step, task.batch);
        let replay = self.replay_samples(task, step);
        let (n_main, n_replay) = (clips.len(), replay.len());
        let all: Vec<Sample> = clips.iter().chain(&replay).copied().collect();
        let seed = task.seed;
        // Targets: the teacher on the hard-class rows, the frozen student on the replay rows.
        let t0 = clock(&self.device)?;
        let teacher = match &mut anchors.teacher {
            Teacher::Model(net) => self
                .answers(net, task.modality.other(), &clips, seed, ask)?
                .into(),
            Teacher::Cached(cache) => {
                let globals = task.plan.globals(self.rank, self.world, step, task.batch);
                self.progress.waiting(|| cache.targets(&globals))?
            }
        };
        let mut targets = vec![teacher.logits.clone()];
        let mut caption_targets = vec![teacher.caption.clone()];
        // Rows trained to their labels have no model's targets: each micro-batch gives them
        // its own (detached) answers as the KL operand, which alpha 0 weighs at nothing.
        let replay_labels = replay_labels && n_replay > 0;
        if n_replay > 0 && !replay_labels {
            let before = match &anchors.student_before {
                Before::Copy(net) => self.answers(net, task.modality, &replay, seed, ask)?.into(),
                Before::StudentBase(switch) => {
                    let _off = switch.off();
                    self.answers(student, task.modality, &replay, seed, ask)?
                        .into()
                }
                Before::Cached => {
                    let (Teacher::Cached(cache), Some(plan)) = (&mut anchors.teacher, &task.replay)
                    else {
                        bail!("cached anchors but no teacher cache or no replay plan");
                    };
                    let globals = plan.globals(self.rank, self.world, step, task.replay_batch);
                    self.progress.waiting(|| cache.anchor_targets(&globals))?
                }
                Before::None | Before::Labels => bail!("replay rows but no frozen student"),
            };
            targets.push(before.logits);
            caption_targets.push(before.caption);
        }
        let answer_targets = Tensor::cat(&targets, 0)?.detach();
        let caption_targets = caption_targets
            .into_iter()
            .collect::<Option<Vec<Tensor>>>()
            .map(|t| Tensor::cat(&t, 0).map(|t| t.detach()))
            .transpose()?;
        // The CE targets of the hard-class rows in label-free mode: the teacher's choices.
        let teacher_choice: Option<Vec<u32>> = if label_free {
            let letters = if full_vocab {
                letter_logits(&teacher.logits, self.vocab_of(student)?)?
            } else {
                teacher.logits.clone()
            };
            Some(letters.argmax(D::Minus1)?.to_vec1::<u32>()?)
        } else {
            None
        };
        let mut times = Timings {
            teacher: ms(clock(&self.device)? - t0),
            ..Timings::default()
        };
        let n_all = all.len();
        let micro = if micro_batch == 0 { n_all } else { micro_batch };
        let mut grads = GradStore::default();
        let (mut total, mut kl, mut ce) = (0.0, 0.0, 0.0);
        for first in (0..n_all).step_by(micro.max(1)) {
            let rows = micro.min(n_all - first);
            let main = n_main.saturating_sub(first).min(rows);
            let s = self.answers(student, task.modality, &all[first..first + rows], seed, ask)?;
            let t_loss = clock(&self.device)?;
            // CE target: the true letter, or the teacher's choice in label-free mode; a token
            // id where the answer spans the whole vocabulary. The replay rows' true letters
            // follow (read only where they are trained to their labels).
            let mut answers: Vec<u32> = match &teacher_choice {
                Some(choice) => choice[first..first + main].to_vec(),
                None => s.answer_idx[..main].to_vec(),
            };
            answers.extend_from_slice(&s.answer_idx[main..rows]);
            let answers: Vec<u32> = if full_vocab {
                let vocab = self.vocab_of(student)?;
                answers.iter().map(|&a| vocab.letter(a as usize)).collect()
            } else {
                answers
            };
            let answers = Tensor::new(answers.as_slice(), &self.device)?;
            let mut loss = answer_loss(
                &s.logits,
                &micro_targets(&answer_targets, &s.logits, first, main, rows, replay_labels)?,
                &answers,
                (main, rows - main),
                n_all,
                temperature,
                alpha,
                replay_labels,
            )?;
            let caption_targets = match (&caption_targets, &s.caption) {
                (Some(t), Some(own)) => {
                    Some(micro_targets(t, own, first, main, rows, replay_labels)?)
                }
                _ => None,
            };
            // The replay rows' class names, where they are trained to their labels.
            let names = match (replay_labels, &s.caption, student) {
                (true, Some(_), Net::StandIn(model)) => {
                    let names: Vec<u32> = s.labels[main..rows]
                        .iter()
                        .map(|(label, _)| model.vocab.class_token(*label))
                        .collect();
                    Some(Tensor::new(names.as_slice(), &self.device)?)
                }
                _ => None,
            };
            let replay_names = names.as_ref().map(|n| (main, n));
            if let Some(caption) = caption_loss(
                &s,
                caption_targets,
                caption_weight,
                n_all,
                temperature,
                replay_names,
            )? {
                loss = LossParts {
                    total: (&loss.total + &caption.total)?,
                    kl: (&loss.kl + &caption.kl)?,
                    ce: loss.ce,
                };
            }
            total += loss.total.to_scalar::<f32>()? as f64;
            kl += loss.kl.to_scalar::<f32>()? as f64;
            ce += loss.ce.to_scalar::<f32>()? as f64;
            times.loss += ms(clock(&self.device)? - t_loss);
            times.tokens += s.tokens;
            add_grads(&mut grads, loss.total.backward()?, vars)?;
        }
        Ok(StepGrads {
            grads,
            loss: total,
            parts: (kl, ce),
            times,
        })
    }

    /// The vocabulary of a stand-in student (`kl_over = "vocab"` needs one).
    fn vocab_of<'a>(&self, student: &'a Net) -> Result<&'a Vocab> {
        match student {
            Net::StandIn(model) => Ok(&model.vocab),
            Net::Qwen(_) => bail!("kl_over = \"vocab\" needs a stand-in student"),
        }
    }
}

/// Adds `part`'s gradients of `vars` into `sum`; the rest of `part` (the frozen operands'
/// gradients candle's backward leaves) is dropped here.
fn add_grads(sum: &mut GradStore, mut part: GradStore, vars: &[(String, Var)]) -> Result<()> {
    for (_, var) in vars {
        if let Some(grad) = part.remove(var.as_tensor()) {
            let grad = match sum.remove(var.as_tensor()) {
                Some(before) => (before + grad)?,
                None => grad,
            };
            sum.insert(var.as_tensor(), grad);
        }
    }
    Ok(())
}

/// A micro-batch's KL operands, rows `first..first + rows` of the step: `targets`' rows, or,
/// where the replay rows are trained to their labels (`targets` then holds the `main` rows'
/// only), the main rows' targets followed by the replay rows' own detached outputs `own`, so
/// their KL is exactly 0 and the cross-entropy alone trains them.
fn micro_targets(
    targets: &Tensor,
    own: &Tensor,
    first: usize,
    main: usize,
    rows: usize,
    replay_labels: bool,
) -> Result<Tensor> {
    if !replay_labels {
        return Ok(targets.narrow(0, first, rows)?);
    }
    let own = own.narrow(0, main, rows - main)?.detach();
    if main == 0 {
        return Ok(own);
    }
    Ok(Tensor::cat(&[&targets.narrow(0, first, main)?, &own], 0)?)
}

/// The captions' loss over a micro-batch's rows, each row weighted `caption_weight` and divided
/// by the step's `n_all` rows, where the student and every target came with a caption: the KL
/// to `targets`, except for the rows from `replay_names`' first on, which are trained to the
/// class names it holds (cross-entropy).
fn caption_loss(
    student: &Answers,
    targets: Option<Tensor>,
    caption_weight: f64,
    n_all: usize,
    temperature: f64,
    replay_names: Option<(usize, &Tensor)>,
) -> Result<Option<LossParts>> {
    let (Some(caption), Some(targets)) = (&student.caption, targets) else {
        return Ok(None);
    };
    let rows = caption.dim(0)?;
    let (main, names) = match replay_names {
        Some((main, names)) => (main, Some(names)),
        None => (rows, None),
    };
    let parts = [(0, main, 1.0, None), (main, rows - main, 0.0, names)];
    sum_parts(
        parts.into_iter().map(|(start, len, alpha, names)| {
            // len / n_all first: one pass over all rows (1.0) weighs each row exactly
            // `caption_weight`.
            let weight = caption_weight * (len as f64 / n_all as f64);
            Ok((start, len, alpha, names.cloned(), weight as f32))
        }),
        caption,
        &targets,
        temperature,
    )
    .map(Some)
}

/// The fused loss of each part `(start, len, alpha, CE targets, row weight)` of a micro-batch's
/// rows of `student` against `teacher`, summed; parts without rows are skipped.
fn sum_parts(
    parts: impl Iterator<Item = Result<(usize, usize, f64, Option<Tensor>, f32)>>,
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Result<LossParts> {
    let mut sum: Option<LossParts> = None;
    for part in parts {
        let (start, len, alpha, targets, weight) = part?;
        if len == 0 {
            continue;
        }
        let loss = xkd_kernels::fused_distill_loss(
            &student.narrow(0, start, len)?,
            &teacher.narrow(0, start, len)?,
            &FusedLoss {
                temperature,
                alpha,
                shared_vocab: None,
                targets,
                weights: Some(Tensor::new(vec![weight; len], student.device())?),
            },
        )?;
        sum = Some(match sum {
            None => loss,
            Some(before) => LossParts {
                total: (&before.total + &loss.total)?,
                kl: (&before.kl + &loss.kl)?,
                ce: (&before.ce + &loss.ce)?,
            },
        });
    }
    sum.context("a micro-batch without rows")
}

/// The answer's loss over a micro-batch of a distillation step: its first `n_main` rows (the
/// hard classes) against the teacher with `alpha` and the CE `targets`, the `n_replay` rows
/// after them either against the frozen pre-distillation student, pure KL, or, with
/// `replay_labels`, against their own letters in `targets`, pure cross-entropy. The fused loss
/// takes one alpha per call, so these are two calls (either may have no rows); row weights of
/// n_part / n_all make both divide by the step's `n_all` rows, as one call over all the step's
/// rows would, so the micro-batches' losses add up to the step's.
#[allow(clippy::too_many_arguments)]
pub(super) fn answer_loss(
    s_answer: &Tensor,
    answer_targets: &Tensor,
    targets: &Tensor,
    (n_main, n_replay): (usize, usize),
    n_all: usize,
    temperature: f64,
    alpha: f64,
    replay_labels: bool,
) -> Result<LossParts> {
    let replay_alpha = if replay_labels { 0.0 } else { 1.0 };
    let parts = [
        (0, n_main, alpha, true),
        (n_main, n_replay, replay_alpha, replay_labels),
    ];
    let parts = parts.into_iter().map(|(start, len, alpha, ce)| {
        let targets = if ce && len > 0 {
            Some(targets.narrow(0, start, len)?)
        } else {
            None
        };
        Ok((start, len, alpha, targets, len as f32 / n_all as f32))
    });
    sum_parts(parts, s_answer, answer_targets, temperature)
}
