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
        if n_replay > 0 {
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
                Before::None => bail!("replay rows but no frozen student"),
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
            // id where the answer spans the whole vocabulary.
            let answers: Vec<u32> = match &teacher_choice {
                Some(choice) => choice[first..first + main].to_vec(),
                None => s.answer_idx[..main].to_vec(),
            };
            let answers: Vec<u32> = if full_vocab {
                let vocab = self.vocab_of(student)?;
                answers.iter().map(|&a| vocab.letter(a as usize)).collect()
            } else {
                answers
            };
            let answers = Tensor::new(answers.as_slice(), &self.device)?;
            let mut loss = answer_loss(
                &s.logits,
                &answer_targets.narrow(0, first, rows)?,
                &answers,
                (main, rows - main),
                n_all,
                temperature,
                alpha,
            )?;
            let caption_targets = caption_targets
                .as_ref()
                .map(|t| t.narrow(0, first, rows))
                .transpose()?;
            if let Some(caption) =
                caption_loss(&s, caption_targets, caption_weight, n_all, temperature)?
            {
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

/// The captions' KL over a micro-batch's rows, each row weighted `caption_weight` and divided
/// by the step's `n_all` rows, where the student and every target came with a caption.
fn caption_loss(
    student: &Answers,
    targets: Option<Tensor>,
    caption_weight: f64,
    n_all: usize,
    temperature: f64,
) -> Result<Option<LossParts>> {
    let (Some(caption), Some(targets)) = (&student.caption, targets) else {
        return Ok(None);
    };
    let rows = caption.dim(0)?;
    // rows / n_all first: one pass over all rows (1.0) weighs each row exactly `caption_weight`.
    let weight = caption_weight * (rows as f64 / n_all as f64);
    let weights = Tensor::new(vec![weight as f32; rows], caption.device())?;
    let loss = xkd_kernels::fused_distill_loss(
        caption,
        &targets,
        &FusedLoss {
            temperature,
            alpha: 1.0,
            shared_vocab: None,
            targets: None,
            weights: Some(weights),
        },
    )?;
    Ok(Some(loss))
}

/// The answer's loss over a micro-batch of a distillation step: its first `n_main` rows (the
/// hard classes) against the teacher with `alpha` and the CE `targets`, the `n_replay` rows
/// after them against the frozen pre-distillation student, pure KL. The fused loss takes one
/// alpha per call, so these are two calls (either may have no rows); row weights of
/// n_part / n_all make both divide by the step's `n_all` rows, as one call over all the step's
/// rows would, so the micro-batches' losses add up to the step's.
pub(super) fn answer_loss(
    s_answer: &Tensor,
    answer_targets: &Tensor,
    targets: &Tensor,
    (n_main, n_replay): (usize, usize),
    n_all: usize,
    temperature: f64,
    alpha: f64,
) -> Result<LossParts> {
    let device = s_answer.device();
    let part = |x: &Tensor, start: usize, len: usize| x.narrow(0, start, len);
    let mut sum: Option<LossParts> = None;
    for (start, len, alpha, targets) in [
        (0, n_main, alpha, Some(targets)),
        (n_main, n_replay, 1.0, None),
    ] {
        if len == 0 {
            continue;
        }
        let weight = len as f32 / n_all as f32;
        let loss = xkd_kernels::fused_distill_loss(
            &part(s_answer, start, len)?,
            &part(answer_targets, start, len)?,
            &FusedLoss {
                temperature,
                alpha,
                shared_vocab: None,
                targets: targets.map(|t| part(t, 0, len)).transpose()?,
                weights: Some(Tensor::new(vec![weight; len], device)?),
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
