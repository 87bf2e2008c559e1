//! The losses of a training step: supervised (pretraining the stand-ins, with the caption
//! loss) and distillation (the teacher on the hard-class rows, the frozen pre-distillation
//! student on the replay rows), through the fused distillation loss of `xkd-kernels`.

use super::inputs::letter_logits;
use super::{clock, ms, Anchors, Rank, Timings};
use anyhow::{bail, Context as _, Result};
use candle_core::{Tensor, D};
use xkd_kernels::{FusedLoss, LossParts};
use xkd_models::model::{Model, Vocab};
use xkd_models::net::Net;
use xkd_protocol::{Objective, Sample, TrainTask};

impl Rank {
    /// The loss of this rank's slice of the `step`-th step from the plans' cursors, its
    /// (kl, ce) parts, and the ms spent in frozen forwards.
    pub(super) fn loss(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: Option<&Anchors>,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        match (student, anchors) {
            (Net::StandIn(s), None) => self.standin_loss(task, s, None, step),
            (
                Net::StandIn(s),
                Some(Anchors {
                    teacher: Net::StandIn(t),
                    student_before: None,
                }),
            ) => self.standin_loss(task, s, Some((t, None)), step),
            (
                Net::StandIn(s),
                Some(Anchors {
                    teacher: Net::StandIn(t),
                    student_before: Some(Net::StandIn(b)),
                }),
            ) => self.standin_loss(task, s, Some((t, Some(b))), step),
            (_, Some(anchors)) => self.letters_loss(task, student, anchors, step),
            (Net::Qwen(_), None) => bail!("a qwen2 model is only distilled, not pretrained"),
        }
    }

    /// The stand-ins' loss: supervised (pretraining, with the caption loss) or distillation
    /// from `anchors` (teacher, pre-distillation student) over the answer and the caption.
    pub(super) fn standin_loss(
        &mut self,
        task: &TrainTask,
        student: &Model,
        anchors: Option<(&Model, Option<&Model>)>,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        let clips = task.plan.samples(self.rank, self.world, step, task.batch);
        let Some((teacher, student_before)) = anchors else {
            let b = self.batch(task.modality, &clips, task.seed)?;
            let (logits, caption) = student.forward_with_caption(&b.features, &b.prompts)?;
            let letters = Tensor::new(student.vocab.letters().as_slice(), &self.device)?;
            let targets = letters.index_select(&b.answers, 0)?;
            let mut loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            if task.caption_weight > 0.0 {
                let names: Vec<u32> = b
                    .labels
                    .iter()
                    .map(|(label, _)| student.vocab.class_token(*label))
                    .collect();
                let names = Tensor::new(names.as_slice(), &self.device)?;
                let caption_loss = candle_nn::loss::cross_entropy(&caption, &names)?;
                loss = (loss + (caption_loss * task.caption_weight)?)?;
            }
            let v = loss.to_scalar::<f32>()? as f64;
            let tokens = b.prompts.elem_count();
            let times = Timings {
                tokens,
                ..Timings::default()
            };
            return Ok((loss, (0.0, v), times));
        };
        let Objective::Distill {
            alpha,
            temperature,
            label_free,
            full_vocab,
            caption_weight,
            ..
        } = task.objective
        else {
            unreachable!("anchors exist only for distillation")
        };
        let replay = self.replay_samples(task, step);
        let (n_main, n_replay) = (clips.len(), replay.len());
        let all: Vec<Sample> = clips.iter().chain(&replay).copied().collect();
        let t0 = clock(&self.device)?;
        let s_batch = self.batch(task.modality, &all, task.seed)?;
        let t_batch = self.batch(task.modality.other(), &clips, task.seed)?;
        let restrict = |logits: Tensor| -> Result<Tensor> {
            if full_vocab {
                Ok(logits)
            } else {
                letter_logits(&logits, &student.vocab)
            }
        };
        // Targets: the teacher on the hard-class rows, the frozen pre-distillation student on
        // the replay rows; answer logits and caption logits of each.
        let (t_answer, t_caption) =
            teacher.forward_with_caption(&t_batch.features, &t_batch.prompts)?;
        let t_answer = restrict(t_answer)?;
        let (mut answer_targets, mut caption_targets) = (vec![t_answer.clone()], vec![t_caption]);
        if n_replay > 0 {
            let rf = s_batch.features.narrow(0, n_main, n_replay)?;
            let rp = s_batch.prompts.narrow(0, n_main, n_replay)?;
            let student_before = student_before.context("replay rows but no frozen student")?;
            let (a_answer, a_caption) = student_before.forward_with_caption(&rf, &rp)?;
            answer_targets.push(restrict(a_answer)?);
            caption_targets.push(a_caption);
        }
        let answer_targets = Tensor::cat(&answer_targets, 0)?.detach();
        let caption_targets = Tensor::cat(&caption_targets, 0)?.detach();
        let teacher = ms(clock(&self.device)? - t0);
        let (s_answer, s_caption) =
            student.forward_with_caption(&s_batch.features, &s_batch.prompts)?;
        let s_answer = restrict(s_answer)?;
        let t_loss = clock(&self.device)?;
        // CE target: the true letter, or the teacher's choice in label-free mode.
        let answers: Vec<u32> = if label_free {
            letters_of(&t_answer, &student.vocab, full_vocab)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?
        } else {
            s_batch.answer_idx[..n_main].to_vec()
        };
        let targets: Vec<u32> = answers
            .iter()
            .map(|&a| {
                if full_vocab {
                    student.vocab.letter(a as usize)
                } else {
                    a
                }
            })
            .collect();
        let targets = Tensor::new(targets.as_slice(), &self.device)?;
        let answer = answer_loss(
            &s_answer,
            &answer_targets,
            &targets,
            (n_main, n_replay),
            temperature,
            alpha,
        )?;
        let weights = |n: usize, w: f32| Tensor::new(vec![w; n], &self.device);
        // The teacher's caption (its next-token distribution right after its own modality
        // tokens) is distilled too: it tells the student's encoder which class it heard
        // directly, not only through the answer letter.
        let caption = xkd_kernels::fused_distill_loss(
            &s_caption,
            &caption_targets,
            &FusedLoss {
                temperature,
                alpha: 1.0,
                shared_vocab: None,
                targets: None,
                weights: Some(weights(n_main + n_replay, caption_weight as f32)?),
            },
        )?;
        let total = (&answer.total + &caption.total)?;
        let kl = (answer.kl.to_scalar::<f32>()? + caption.kl.to_scalar::<f32>()?) as f64;
        let ce = answer.ce.to_scalar::<f32>()? as f64;
        let loss = ms(clock(&self.device)? - t_loss);
        let tokens = s_batch.prompts.elem_count();
        Ok((
            total,
            (kl, ce),
            Timings {
                teacher,
                loss,
                tokens,
            },
        ))
    }

    /// Distillation through the option letters only, for any pair of models (a Qwen2 teacher
    /// or student among them): the teacher's letter logits on the hard-class rows and the
    /// frozen pre-distillation student's on the replay rows are the targets of the student's.
    /// No caption term (the config refuses a caption weight with a Qwen2 model).
    pub(super) fn letters_loss(
        &mut self,
        task: &TrainTask,
        student: &Net,
        anchors: &Anchors,
        step: u64,
    ) -> Result<(Tensor, (f64, f64), Timings)> {
        let Objective::Distill {
            alpha,
            temperature,
            label_free,
            ..
        } = task.objective
        else {
            bail!("letters_loss is a distillation loss");
        };
        let clips = task.plan.samples(self.rank, self.world, step, task.batch);
        let replay = self.replay_samples(task, step);
        let (n_main, n_replay) = (clips.len(), replay.len());
        let all: Vec<Sample> = clips.iter().chain(&replay).copied().collect();
        let t0 = clock(&self.device)?;
        let seed = task.seed;
        let teacher = self.answers(&anchors.teacher, task.modality.other(), &clips, seed)?;
        let mut targets = vec![teacher.letters.clone()];
        if n_replay > 0 {
            let student_before = anchors
                .student_before
                .as_ref()
                .context("replay rows but no frozen student")?;
            let before = self.answers(student_before, task.modality, &replay, seed)?;
            targets.push(before.letters);
        }
        let answer_targets = Tensor::cat(&targets, 0)?.detach();
        let teacher_ms = ms(clock(&self.device)? - t0);
        let s = self.answers(student, task.modality, &all, seed)?;
        let t_loss = clock(&self.device)?;
        let answers: Vec<u32> = if label_free {
            teacher.letters.argmax(D::Minus1)?.to_vec1::<u32>()?
        } else {
            s.answer_idx[..n_main].to_vec()
        };
        let answers = Tensor::new(answers.as_slice(), &self.device)?;
        let loss = answer_loss(
            &s.letters,
            &answer_targets,
            &answers,
            (n_main, n_replay),
            temperature,
            alpha,
        )?;
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

/// The ten letter logits of `logits`, which hold the whole vocabulary when `full`.
pub(super) fn letters_of(logits: &Tensor, vocab: &Vocab, full: bool) -> Result<Tensor> {
    if full {
        letter_logits(logits, vocab)
    } else {
        Ok(logits.clone())
    }
}
