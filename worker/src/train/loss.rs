//! The losses of a training step, one flow per objective whatever the models: supervised
//! (pretraining the stand-ins, with the caption loss), and distillation (the teacher on the
//! hard-class rows, the frozen pre-distillation student on the replay rows), through the fused
//! distillation loss of `xkd-kernels`. Every model is asked through `Rank::answers`.

use super::inputs::{letter_logits, Answers, Ask};
use super::teacher_cache::Targets;
use super::{clock, ms, Anchors, Before, Rank, Teacher, Timings};
use anyhow::{bail, Context as _, Result};
use candle_core::{Tensor, D};
use xkd_kernels::{FusedLoss, LossParts};
use xkd_models::model::Vocab;
use xkd_models::net::Net;
use xkd_protocol::{Objective, Sample, TrainTask};

impl Rank {
    /// The loss of this rank's slice of the `step`-th step from the plans' cursors, its
    /// (kl, ce) parts, and the ms spent in frozen forwards.
    pub(super) fn loss(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: Option<&mut Anchors>,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        match (anchors, student) {
            (Some(anchors), _) => self.distill_loss(task, student, anchors, step),
            (None, Net::StandIn(s)) => self.supervised_loss(task, student, &s.vocab, step),
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
    /// term (the config refuses a caption weight with one).
    fn distill_loss(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: &mut Anchors,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        let Objective::Distill {
            alpha,
            temperature,
            label_free,
            full_vocab,
            caption_weight,
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
            Teacher::Model(net) => {
                let a = self.answers(net, task.modality.other(), &clips, seed, ask)?;
                Targets {
                    logits: a.logits,
                    caption: a.caption,
                }
            }
            Teacher::Cached(cache) => {
                let globals = task.plan.globals(self.rank, self.world, step, task.batch);
                self.progress.waiting(|| cache.targets(&globals))?
            }
        };
        let mut targets = vec![teacher.logits.clone()];
        let mut caption_targets = vec![teacher.caption.clone()];
        if n_replay > 0 {
            let before = match &anchors.student_before {
                Before::Copy(net) => self.answers(net, task.modality, &replay, seed, ask)?,
                Before::StudentBase(switch) => {
                    let _off = switch.off();
                    self.answers(student, task.modality, &replay, seed, ask)?
                }
                Before::None => bail!("replay rows but no frozen student"),
            };
            targets.push(before.logits);
            caption_targets.push(before.caption);
        }
        let answer_targets = Tensor::cat(&targets, 0)?.detach();
        let teacher_ms = ms(clock(&self.device)? - t0);
        let s = self.answers(student, task.modality, &all, seed, ask)?;
        let t_loss = clock(&self.device)?;
        let vocab = || -> Result<&Vocab> {
            match student {
                Net::StandIn(model) => Ok(&model.vocab),
                Net::Qwen(_) => bail!("kl_over = \"vocab\" needs a stand-in student"),
            }
        };
        // CE target: the true letter, or the teacher's choice in label-free mode; a token id
        // where the answer spans the whole vocabulary.
        let answers: Vec<u32> = if label_free {
            let letters = if full_vocab {
                letter_logits(&teacher.logits, vocab()?)?
            } else {
                teacher.logits.clone()
            };
            letters.argmax(D::Minus1)?.to_vec1::<u32>()?
        } else {
            s.answer_idx[..n_main].to_vec()
        };
        let answers: Vec<u32> = if full_vocab {
            let vocab = vocab()?;
            answers.iter().map(|&a| vocab.letter(a as usize)).collect()
        } else {
            answers
        };
        let answers = Tensor::new(answers.as_slice(), &self.device)?;
        let mut loss = answer_loss(
            &s.logits,
            &answer_targets,
            &answers,
            (n_main, n_replay),
            temperature,
            alpha,
        )?;
        if let Some(caption) = caption_loss(&s, caption_targets, caption_weight, temperature)? {
            loss = LossParts {
                total: (&loss.total + &caption.total)?,
                kl: (&loss.kl + &caption.kl)?,
                ce: loss.ce,
            };
        }
        let kl = loss.kl.to_scalar::<f32>()? as f64;
        let ce = loss.ce.to_scalar::<f32>()? as f64;
        let loss_ms = ms(clock(&self.device)? - t_loss);
        Ok((
            loss.total,
            (kl, ce),
            Timings {
                teacher: teacher_ms,
                loss: loss_ms,
                tokens: s.tokens,
            },
        ))
    }
}

/// The captions' KL over every row of the batch, each row weighted `caption_weight`, where
/// the student and every target came with a caption.
fn caption_loss(
    student: &Answers,
    targets: Vec<Option<Tensor>>,
    caption_weight: f64,
    temperature: f64,
) -> Result<Option<LossParts>> {
    let (Some(caption), Some(targets)) = (
        &student.caption,
        targets.into_iter().collect::<Option<Vec<Tensor>>>(),
    ) else {
        return Ok(None);
    };
    let rows = caption.dim(0)?;
    let weights = Tensor::new(vec![caption_weight as f32; rows], caption.device())?;
    let loss = xkd_kernels::fused_distill_loss(
        caption,
        &Tensor::cat(&targets, 0)?.detach(),
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

/// The answer's loss over a distillation batch: its first `n_main` rows (the hard classes)
/// against the teacher with `alpha` and the CE `targets`, the `n_replay` rows after them against
/// the frozen pre-distillation student, pure KL. The fused loss takes one alpha per call, so
/// these are two calls; row weights of n_part / n_all make both divide by the whole batch, as
/// one call over all rows would.
pub(super) fn answer_loss(
    s_answer: &Tensor,
    answer_targets: &Tensor,
    targets: &Tensor,
    (n_main, n_replay): (usize, usize),
    temperature: f64,
    alpha: f64,
) -> Result<LossParts> {
    let device = s_answer.device();
    let n_all = (n_main + n_replay) as f32;
    let weights = |n: usize, w: f32| Tensor::new(vec![w; n], device);
    let part = |x: &Tensor, start: usize, len: usize| x.narrow(0, start, len);
    let mut answer = xkd_kernels::fused_distill_loss(
        &part(s_answer, 0, n_main)?,
        &part(answer_targets, 0, n_main)?,
        &FusedLoss {
            temperature,
            alpha,
            shared_vocab: None,
            targets: Some(part(targets, 0, n_main)?),
            weights: Some(weights(n_main, n_main as f32 / n_all)?),
        },
    )?;
    if n_replay > 0 {
        let replay = xkd_kernels::fused_distill_loss(
            &part(s_answer, n_main, n_replay)?,
            &part(answer_targets, n_main, n_replay)?,
            &FusedLoss {
                temperature,
                alpha: 1.0,
                shared_vocab: None,
                targets: None,
                weights: Some(weights(n_replay, n_replay as f32 / n_all)?),
            },
        )?;
        answer = LossParts {
            total: (&answer.total + &replay.total)?,
            kl: (&answer.kl + &replay.kl)?,
            ce: answer.ce,
        };
    }
    Ok(answer)
}
