//! The work a rank does: data-parallel training (supervised or distillation) and evaluation.
//!
//! Every rank runs the same step on its own slice of the global batch, then averages the
//! gradient through the `Collective`, so all ranks apply identical updates and hold identical
//! parameters. Gradients are packed in parameter name order into `Buckets`, the same layout on
//! every rank.

use crate::hold::{Faults, Hold};
use crate::optim::AdamW;
use crate::progress::Progress;
use crate::saver::{self, Saver, Sink};
use anyhow::{bail, Context as _, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use xkd_collective::buckets::Buckets;
use xkd_collective::Collective;
use xkd_config::{Config, DeviceChoice, Modality};
use xkd_data::Manifest;
use xkd_models::model::{self, InputShape, Model, Vocab};
use xkd_models::net::{self, Net, Params};
use xkd_models::qwen::lora::LoraSwitch;
use xkd_models::qwen::{LoraAdapters, QwenModel};
use xkd_protocol::{
    ClipOutcome, EvalTask, Objective, Sample, StepReport, TrainSummary, TrainTask, WorkerMsg,
};

mod inputs;
mod loss;
pub mod teacher_cache;

pub(crate) use inputs::PREFETCH_STEPS;
use inputs::{outcome, Ask, Inputs};

/// Clips an evaluation (or probe) forward takes at once: 64 of a stand-in's small questions;
/// 4 of a Qwen2 model's, whose questions are hundreds (audio) to thousands (video) of tokens
/// and whose attention scores alone are then gigabytes a clip (`xkd plan` counts them).
pub(crate) fn eval_chunk(qwen: bool) -> usize {
    if qwen {
        4
    } else {
        64
    }
}

/// What one rank holds across tasks: config, dataset, feature caches and its collective.
pub struct Rank {
    pub config: Config,
    pub rank: u32,
    pub world: u32,
    pub collective: Box<dyn Collective>,
    /// The loaded dataset (`PrepareData`); shared with the loader's threads.
    pub manifest: Option<Arc<Manifest>>,
    /// Set to end the running training task early (preemption): ranks agree on the step
    /// through the all-reduce, rank 0 checkpoints it, and `train` returns `stopped`.
    pub stop: Arc<AtomicBool>,
    /// What this rank's compute thread has done, read by the heartbeat (`Progress`).
    pub progress: Arc<Progress>,
    /// How clips are read: made for the loaded manifest on first use, remade for a new one.
    inputs: Option<Arc<Inputs>>,
    device: Device,
}

impl Rank {
    /// Fails when `run.device` names a device this process cannot open.
    pub fn new(
        config: Config,
        rank: u32,
        world: u32,
        collective: Box<dyn Collective>,
    ) -> Result<Rank> {
        let device = device(config.run.device_choice())?;
        Ok(Rank::with_device(config, rank, world, device, collective))
    }

    /// A rank on a device already opened (the NCCL collective needs it before the rank).
    pub fn with_device(
        config: Config,
        rank: u32,
        world: u32,
        device: Device,
        collective: Box<dyn Collective>,
    ) -> Rank {
        Rank {
            config,
            rank,
            world,
            collective,
            manifest: None,
            stop: Arc::new(AtomicBool::new(false)),
            progress: Arc::default(),
            inputs: None,
            device,
        }
    }

    pub fn manifest(&self) -> Result<&Arc<Manifest>> {
        self.manifest
            .as_ref()
            .context("the dataset is not loaded on this rank (PrepareData was not run)")
    }

    /// The clip loader of the loaded dataset.
    fn inputs(&mut self) -> Result<Arc<Inputs>> {
        let manifest = self.manifest()?.clone();
        match &self.inputs {
            Some(inputs) if inputs.serves(&manifest) => Ok(inputs.clone()),
            _ => {
                // The old loader's threads stop before the new one's start.
                self.inputs = None;
                let inputs = Arc::new(Inputs::new(&self.config, manifest));
                self.inputs = Some(inputs.clone());
                Ok(inputs)
            }
        }
    }

    fn input_shape(&self) -> InputShape {
        InputShape {
            n_mels: self.config.features.n_mels,
            frames: self.config.data.frames,
            frame_size: self.config.data.frame_size,
        }
    }

    fn vocab(&self) -> Result<Vocab> {
        Ok(Vocab::new(self.manifest()?.classes.len()))
    }

    /// A fresh model of `modality` with its parameters; `init` loads them from a file, else
    /// they are drawn from `seed`.
    pub fn build_model(
        &self,
        modality: Modality,
        init: Option<&str>,
        seed: u64,
    ) -> Result<(VarMap, Model)> {
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &self.device);
        let model = Model::new(
            modality,
            self.config.model(modality),
            self.input_shape(),
            self.vocab()?,
            vb,
        )?;
        match init {
            Some(path) => varmap
                .load(path)
                .with_context(|| format!("loading {modality:?} model from {path}"))?,
            None => model::init_params(&varmap, seed)?,
        }
        Ok((varmap, model))
    }

    /// The student of `task` and what it trains: a stand-in from `task.init` (or drawn from
    /// the seed), trained whole; or a Qwen2 model from its directory with LoRA adapters, fresh
    /// (`task.init` is the base directory) or saved ones (`task.init` is an adapter directory).
    fn build_student(&self, task: &TrainTask) -> Result<(Params, Net)> {
        if !net::is_qwen2(&self.config, task.modality) {
            let (varmap, model) =
                self.build_model(task.modality, task.init.as_deref(), task.seed)?;
            return Ok((Params::Full(varmap), Net::StandIn(Box::new(model))));
        }
        if matches!(task.objective, Objective::Supervised) {
            bail!(
                "a qwen2 {} model is taken as pretrained; xkd does not pretrain it",
                task.modality.as_str()
            );
        }
        let base = self.config.model(task.modality).dir.clone();
        // Base weights as a frozen model's (bf16 on a GPU); the adapters are f32 `Var`s.
        let mut qwen = self.load_qwen(task.modality, self.frozen_dtype())?;
        let adapters = match task.init.as_deref().filter(|p| net::is_adapter_dir(p)) {
            Some(dir) => {
                let adapters = LoraAdapters::load(Path::new(dir), &self.device)
                    .with_context(|| format!("loading LoRA adapters from {dir}"))?;
                qwen.attach_lora(&adapters)?;
                adapters
            }
            None => qwen.init_lora(self.config.lora.clone(), task.seed)?,
        };
        qwen.set_training(true);
        Ok((Params::Lora { adapters, base }, Net::Qwen(Box::new(qwen))))
    }

    /// The Qwen2 model of `modality` from its configured directory, weights in `dtype`.
    fn load_qwen(&self, modality: Modality, dtype: DType) -> Result<QwenModel> {
        let dir = &self.config.model(modality).dir;
        let (local, fetched) = net::local_model_dir(dir, &self.config.run.cache_dir)?;
        if fetched == net::Fetched::Cached {
            tracing::info!(rank = self.rank, model = dir, to = %local.display(),
                "model directory found in the node's cache");
        }
        let qwen = QwenModel::load(&local, net::family(modality), dtype, &self.device)
            .with_context(|| format!("loading the {} model from {dir}", modality.as_str()))?;
        tracing::info!(
            rank = self.rank,
            ?modality,
            parameters = qwen.parameters(),
            ?dtype,
            dir = %dir,
            "qwen2 model"
        );
        if let Some(rate) = qwen.sampling_rate() {
            if rate != self.config.data.sample_rate {
                bail!(
                    "{dir} takes audio at {rate} Hz but data.sample_rate is {}",
                    self.config.data.sample_rate
                );
            }
        }
        Ok(qwen)
    }

    /// A model to evaluate or to read targets from (`frozen`): a stand-in loaded from `path`,
    /// or the configured Qwen2 model with the adapters in `path` when it is an adapter
    /// directory.
    fn build_net(&self, modality: Modality, path: &str, seed: u64, frozen: bool) -> Result<Net> {
        if !frozen {
            if let Some(student) = saver::read_student(path)? {
                return self.net_from_checkpoint(modality, &student, seed, path);
            }
        }
        let dtype = self.frozen_dtype();
        if !net::is_qwen2(&self.config, modality) {
            return Ok(Net::StandIn(Box::new(if frozen {
                self.build_frozen(modality, path)?
            } else {
                self.build_model(modality, Some(path), seed)?.1
            })));
        }
        // The base in the dtype distillation trained it over (its adapters stay f32).
        let mut qwen = self.load_qwen(modality, dtype)?;
        if net::is_adapter_dir(path) {
            let adapters = LoraAdapters::load(Path::new(path), &self.device)
                .with_context(|| format!("loading LoRA adapters from {path}"))?;
            adapters.switch().freeze();
            qwen.attach_lora(&adapters)?;
        }
        Ok(Net::Qwen(Box::new(qwen)))
    }

    /// The student a checkpoint holds (`student`, its `student.safetensors`), built as
    /// distillation builds it and then given the checkpoint's parameters: a stand-in whole, or
    /// the configured Qwen2 base with adapters. `xkd eval --checkpoint` evaluates this.
    fn net_from_checkpoint(
        &self,
        modality: Modality,
        student: &[u8],
        seed: u64,
        url: &str,
    ) -> Result<Net> {
        let (params, net) = if net::is_qwen2(&self.config, modality) {
            let mut qwen = self.load_qwen(modality, self.frozen_dtype())?;
            let adapters = qwen.init_lora(self.config.lora.clone(), seed)?;
            let base = self.config.model(modality).dir.clone();
            (Params::Lora { adapters, base }, Net::Qwen(Box::new(qwen)))
        } else {
            let (varmap, model) = self.build_model(modality, None, seed)?;
            (Params::Full(varmap), Net::StandIn(Box::new(model)))
        };
        restore_params(&params, student)
            .with_context(|| format!("the student of {url} does not fit this config's model"))?;
        if let Params::Lora { adapters, .. } = &params {
            adapters.switch().freeze();
        }
        tracing::info!(
            rank = self.rank,
            ?modality,
            checkpoint = url,
            "student from checkpoint"
        );
        Ok(net)
    }

    /// bf16 on a GPU, where frozen weights are the bulk of the memory and their forward the
    /// bulk of a step; f32 on CPU, where bf16 matmuls are slower than f32 ones.
    fn frozen_dtype(&self) -> DType {
        if self.device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// A frozen stand-in (the teacher, the pre-distillation student) loaded from `path`, in
    /// `frozen_dtype`. Its logits are f32.
    fn build_frozen(&self, modality: Modality, path: &str) -> Result<Model> {
        let dtype = self.frozen_dtype();
        let tensors = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("loading frozen {modality:?} model from {path}"))?;
        let parameters: usize = tensors.values().map(Tensor::elem_count).sum();
        tracing::info!(
            rank = self.rank,
            ?modality,
            parameters,
            ?dtype,
            "frozen model"
        );
        let vb = VarBuilder::from_tensors(tensors, dtype, &self.device);
        let cfg = self.config.model(modality);
        Model::new(modality, cfg, self.input_shape(), self.vocab()?, vb)
            .with_context(|| format!("building frozen {modality:?} model from {path}"))
    }
}

/// Whether this binary's candle was built with CUDA (its `cuda` feature), so that
/// `run.device = cuda` can be refused at startup instead of when the first task arrives.
pub fn cuda_compiled() -> bool {
    candle_core::utils::cuda_is_available()
}

/// The candle device `run.device` names, for this process (`gpu_ordinal` with its
/// environment). Without CUDA compiled in, candle refuses a CUDA device here; the `xkd` binary
/// checks `cuda_compiled` before that, at startup.
pub fn device(choice: DeviceChoice) -> Result<Device> {
    match gpu_ordinal(choice, |name| std::env::var(name).ok())? {
        None => Ok(Device::Cpu),
        // A stream of its own, not candle's default (CUDA's per-thread default stream): a
        // rank's tasks run on different threads (one `spawn_blocking` each), and the per-thread
        // stream would put each task's kernels, and the frees of tensors kept across tasks, on
        // a different stream, ordered with nothing; NCCL gets the same stream.
        Some(n) => Device::new_cuda_with_stream(n)
            .with_context(|| format!("opening GPU {n} for run.device = {choice}")),
    }
}

/// Which GPU a worker takes (`None` on CPU). `cuda:N` is GPU N. `cuda` is the one GPU its
/// launcher left visible when it left exactly one (`CUDA_VISIBLE_DEVICES` with one entry, as
/// Slurm's `--gpus-per-task=1` or a one-GPU pod does; CUDA numbers it 0), else the worker's
/// local rank on its node: `XKD_LOCAL_RANK` (set by `xkd run` for its workers), `LOCAL_RANK`
/// (torchrun's and many launchers' name), or Slurm's `SLURM_LOCALID`, else 0.
pub fn gpu_ordinal(
    choice: DeviceChoice,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<usize>> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Cuda(Some(n)) => Ok(Some(n)),
        DeviceChoice::Cuda(None) => {
            let visible = env("CUDA_VISIBLE_DEVICES").unwrap_or_default();
            if !visible.trim().is_empty() && visible.split(',').count() == 1 {
                return Ok(Some(0));
            }
            for name in ["XKD_LOCAL_RANK", "LOCAL_RANK", "SLURM_LOCALID"] {
                if let Some(value) = env(name) {
                    let n = value.trim().parse().with_context(|| {
                        format!("{name}={value:?} is not a local rank (a number from 0)")
                    })?;
                    return Ok(Some(n));
                }
            }
            Ok(Some(0))
        }
    }
}

/// Average gradients over ranks bucket by bucket (`Buckets`), then clip their global norm to
/// `clip` (0 = no clipping); returns the norm before clipping, and whether any rank asked to
/// stop. Every rank clips the same averaged bytes, so ranks stay identical. The norm is taken
/// over all buckets together, in layout order, so it is the norm of the whole gradient.
///
/// The stop vote rides in one extra element after the gradients (1 from a rank that wants to
/// stop, else 0), the last element of the last bucket: every rank sees the same mean, so all
/// of them stop after the same step without another round trip.
fn all_reduce_grads(
    progress: &Progress,
    collective: &mut dyn Collective,
    buckets: &Buckets,
    vars: &[(String, Var)],
    grads: &mut GradStore,
    clip: f64,
    stop: bool,
) -> Result<(f64, bool)> {
    let mut buffers = buckets.flatten(vars, grads)?;
    let device = vars
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let vote = Tensor::new(&[if stop { 1f32 } else { 0f32 }], &device)?;
    match buffers.last_mut() {
        Some(last) => *last = Tensor::cat(&[&*last, &vote], 0)?,
        None => buffers.push(vote),
    }
    progress.waiting(|| collective.all_reduce_buckets(&mut buffers))?;
    let last = buffers.pop().expect("the vote's bucket");
    let n = last.elem_count() - 1;
    let votes = last.get(n)?.to_scalar::<f32>()? * collective.world_size() as f32;
    if !buckets.sizes().is_empty() {
        buffers.push(last.narrow(0, 0, n)?);
    }
    // The mean of 0s and 1s over W ranks is a multiple of 1/W. Anything else was not
    // written by the all-reduce (as NCCL's out-of-place average left the end of a buffer on
    // the first GPU run), and the gradients beside it cannot be trusted either.
    let whole = (votes - votes.round()).abs() < 1e-3 && votes > -1e-3; // false for NaN
    if !whole {
        bail!(
            "the all-reduce returned a stop vote of {votes} ranks, not a whole number: the \
             collective did not write its whole buffer"
        );
    }
    let stop = votes > 0.5;
    // Squares summed in f64. The norm sets the clip scale of nearly every step of the default
    // job, and its pretraining follows that scale's last bits chaotically: summing in f32
    // instead left both stand-ins at a final loss of 0.3 to 0.7 rather than 0.01 and the
    // heuristic picked 3 of the 8 built hard classes instead of all 8 (measured, same seeds).
    let mut norm = 0f64;
    for b in &buffers {
        norm += b
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = norm.sqrt();
    if clip > 0.0 && norm > clip {
        let scale = clip / norm;
        for b in &mut buffers {
            *b = b.affine(scale, 0.0)?;
        }
    }
    buckets.unflatten(vars, &buffers, grads)?;
    Ok((norm, stop))
}

/// Where a step's time went before its backward pass, in ms (see `StepReport`).
#[derive(Debug, Default, Clone, Copy)]
struct Timings {
    /// Frozen forwards, with building their batches.
    teacher: f64,
    /// The distillation loss's forward (its backward is a scale inside the student's).
    loss: f64,
    /// Tokens of this rank's student sequences (prompt with the modality tokens in it).
    tokens: usize,
}

/// Now, once the device has finished what was queued: on a GPU, timing a phase without the
/// synchronisation would measure kernel launches, not the kernels. A no-op wait on CPU.
fn clock(device: &Device) -> Result<Instant> {
    device.synchronize()?;
    Ok(Instant::now())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Linear warm-up, then cosine decay to a tenth of the peak.
pub fn learning_rate(step: u64, steps: u64, warmup: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Frozen models a distillation step reads: the teacher, and the pre-distillation student
/// when there are replay rows.
struct Anchors {
    teacher: Teacher,
    student_before: Before,
}

/// Where the teacher's answers come from (`distill.teacher`).
enum Teacher {
    /// The frozen teacher itself, asked every step.
    Model(Net),
    /// Its answers as the caching stage stored them; the teacher is not loaded.
    Cached(Box<teacher_cache::CachedTeacher>),
}

/// The student before distillation, which the replay rows are anchored to.
enum Before {
    /// No replay rows.
    None,
    /// The replay rows are trained to their own labels (`distill.replay_target = "label"`):
    /// no frozen student is built and none runs.
    Labels,
    /// A model of its own: a stand-in student (trained whole, so its pretrained weights are a
    /// copy), or a Qwen2 student that started from saved adapters.
    Copy(Net),
    /// A Qwen2 student that started from fresh adapters (`B` = 0): its base with the adapters
    /// off is what it computed before distillation, so no second copy of the base weights is
    /// loaded. `XKD_TEST_ANCHOR_COPY=1` loads the copy instead (tests compare the two).
    StudentBase(LoraSwitch),
    /// The teacher cache holds the anchors (`distill.teacher = "cached"`): no frozen student
    /// is built and none runs.
    Cached,
}

/// Set by tests only: the replay anchor of a Qwen2 student is a second copy of its base.
const ANCHOR_COPY_VAR: &str = "XKD_TEST_ANCHOR_COPY";

impl Rank {
    /// Train one model data-parallel for `task.steps` steps; rank 0 saves it, and puts the
    /// checkpoints `task.checkpoint` orders into the store. `send` takes the messages for the
    /// coordinator (step reports, saved checkpoints); checkpoint uploads call it from their
    /// own thread, and the last one has called it before this returns.
    pub fn train(
        &mut self,
        task_id: u64,
        task: &TrainTask,
        send: impl Fn(WorkerMsg) + Send + Sync + 'static,
    ) -> Result<TrainSummary> {
        let start = Instant::now();
        let send: Sink = Arc::new(send);
        let faults = match task.checkpoint {
            Some(_) => Faults::from_env(self.rank)?,
            None => Faults::default(),
        };
        if task.keep_saved {
            if let Some(summary) = self.reuse_saved(task, start)? {
                return Ok(summary);
            }
        }
        let (params, student) = self.build_student(task)?;
        self.progress.tick();
        let mut anchors = self.anchors(task, &params)?;
        self.progress.tick();
        let inputs = self.inputs()?;
        let loaded_before = inputs.stats();
        inputs.register_net(task.modality, &student);
        if let Some(anchors) = &anchors {
            if let Teacher::Model(teacher) = &anchors.teacher {
                inputs.register_net(task.modality.other(), teacher);
            }
            if let Before::Copy(net) = &anchors.student_before {
                inputs.register_net(task.modality, net);
            }
        }
        let vars = params.trainable();
        let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        let parameters: usize = params.named().iter().map(|(_, v)| v.elem_count()).sum();
        tracing::info!(rank = self.rank, modality = ?task.modality, parameters, trainable, "student model");
        let buckets = Buckets::for_vars(&vars, self.config.collective.bucket_bytes());
        let hyper = ParamsAdamW {
            lr: task.lr,
            weight_decay: task.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vars, hyper)?;
        let first = task.resume_from.unwrap_or(0);
        if let Some(step) = task.resume_from {
            let order = task
                .checkpoint
                .as_ref()
                .context("resume_from names a checkpoint but the task has no store")?;
            let (student, optimizer) = saver::read_checkpoint(order, step)?;
            restore(&params, &mut opt, &student, &optimizer)
                .with_context(|| format!("restoring checkpoint {step} of {}", order.url))?;
            tracing::info!(rank = self.rank, step, "resumed from checkpoint");
            self.progress.tick();
        }
        // Ranks load their models at their own pace (tens of GB each, for the paper's pair);
        // they meet here, under the join timeout, so the collective timeout bounds only how
        // far they drift apart within a step.
        faults.delay_setup(self.rank);
        let setup = std::time::Duration::from_millis(self.config.control.join_timeout_ms);
        let collective = self.collective.as_mut();
        self.progress
            .waiting(|| collective.barrier_within(setup))
            .context("waiting for every rank to finish loading its models")?;
        let mut saver = match &task.checkpoint {
            Some(order) if self.rank == 0 => Some(Saver::new(task_id, order, send.clone())?),
            _ => None,
        };
        let holds = match saver {
            Some(_) => Hold::from_env()?,
            None => Vec::new(),
        };
        let mut last_loss = f64::NAN;
        let mut taken = first;
        let mut stopped = false;
        let mut deferred = false;
        for step in first..task.steps {
            let lr = learning_rate(step, task.steps, task.warmup_steps, task.lr);
            opt.set_learning_rate(lr);
            params.start_step(task.seed, step, self.rank, &self.device)?;
            let online = matches!(&anchors, Some(a) if matches!(a.teacher, Teacher::Model(_)));
            self.prefetch_steps(&inputs, task, step - first, online);
            let t0 = clock(&self.device)?;
            let loss::StepGrads {
                mut grads,
                loss,
                parts,
                times,
            } = self.gradients(task, &student, anchors.as_mut(), step - first, &vars)?;
            let t1 = clock(&self.device)?;
            let ms_student = ms(t1 - t0) - times.teacher - times.loss;
            let (grad_norm, stop) = all_reduce_grads(
                &self.progress,
                self.collective.as_mut(),
                &buckets,
                &vars,
                &mut grads,
                task.grad_clip,
                self.stop.load(Ordering::Relaxed),
            )?;
            let t2 = clock(&self.device)?;
            let ms_allreduce = ms(t2 - t1);
            opt.step(&grads)?;
            self.progress.tick();
            let ms_optimizer = ms(clock(&self.device)? - t2);
            last_loss = loss;
            if !last_loss.is_finite() {
                bail!("loss is {last_loss} at step {step}: training diverged");
            }
            let every = self.config.log.every.max(1);
            if (step + 1) % every == 0 || step + 1 == task.steps {
                let elapsed = t0.elapsed().as_secs_f64();
                send(WorkerMsg::Step(StepReport {
                    task: task_id,
                    rank: self.rank,
                    step: step + 1,
                    loss: last_loss,
                    kl: parts.0,
                    ce: parts.1,
                    lr,
                    grad_norm,
                    samples_per_s: (task.batch + task.replay_batch) as f64 * self.world as f64
                        / elapsed,
                    tokens_per_s: (times.tokens * self.world as usize) as f64 / elapsed,
                    ms_teacher: times.teacher,
                    ms_student,
                    ms_loss: times.loss,
                    ms_allreduce,
                    ms_optimizer,
                }));
            }
            taken = step + 1;
            stopped = stop && taken < task.steps;
            if let Some(saver) = saver.as_mut() {
                // A save never waits inside a step (the other ranks would wait for rank 0 in
                // the next all-reduce): one that comes due while the previous upload is still
                // running is deferred to the first step after it has finished. The last one
                // (the final step, or the step all ranks stopped at) is queued behind it.
                let due = stopped || saver.due(taken, task.steps);
                let last = stopped || taken == task.steps;
                if due && !last && saver.busy() {
                    tracing::info!(
                        rank = self.rank,
                        step = taken,
                        "checkpoint deferred: the previous upload is still running"
                    );
                    deferred = true;
                } else if due || (deferred && !saver.busy()) {
                    let (student, optimizer) = snapshot(&params, &opt)?;
                    saver.save(taken, last_loss, student, optimizer);
                    deferred = false;
                    if let Some(hold) = holds.iter().find(|h| h.step == taken && !stopped) {
                        saver.wait();
                        hold.wait(self.rank, &self.stop);
                    }
                }
            }
            faults.stall_after(self.rank, taken)?;
            if stopped {
                tracing::info!(rank = self.rank, step = taken, "stopping early, as asked");
                break;
            }
        }
        inputs.prefetch(&self.config, &[]);
        let loads = inputs.stats().since(loaded_before);
        tracing::info!(
            rank = self.rank,
            ahead = loads.ahead,
            waited = loads.waits,
            reused = loads.hits,
            on_training_thread = loads.misses,
            cache_mib = inputs.cache_bytes() >> 20,
            "clips loaded"
        );
        let digest = digest_params(&params)?;
        if !stopped {
            self.save(&params, &task.save)?;
        }
        let collective = self.collective.as_mut();
        self.progress.waiting(|| collective.barrier())?;
        // Rank 0's last uploads finish after the barrier, so no rank waits for the store in a
        // collective; the store's retries bound this wait.
        if let Some(mut saver) = saver.take() {
            self.progress.waiting(|| saver.wait());
        }
        Ok(TrainSummary {
            steps: taken,
            stopped,
            final_loss: last_loss,
            wall_seconds: start.elapsed().as_secs_f64(),
            digest,
            reused: false,
        })
    }

    /// The model `task.save` holds when every rank finds one there (one vote each, summed
    /// over the ring), so that all ranks skip training or none does; `None` to train.
    fn reuse_saved(&mut self, task: &TrainTask, start: Instant) -> Result<Option<TrainSummary>> {
        let have = Path::new(&task.save).is_file();
        let mut votes = [if have { 1.0f32 } else { 0.0 }];
        let collective = self.collective.as_mut();
        self.progress
            .waiting(|| collective.all_reduce_mean(&mut votes))
            .context("asking every rank whether it has the saved model")?;
        // The mean times the world is the number of ranks that have it, up to rounding.
        if (1.0 - votes[0]) * self.world as f32 > 0.5 {
            if have {
                tracing::info!(
                    rank = self.rank,
                    path = task.save,
                    "another rank lacks the saved model: every rank trains it again"
                );
            }
            return Ok(None);
        }
        let (varmap, _) = self.build_model(task.modality, Some(&task.save), task.seed)?;
        self.progress.tick();
        Ok(Some(TrainSummary {
            steps: 0,
            stopped: false,
            final_loss: f64::NAN,
            wall_seconds: start.elapsed().as_secs_f64(),
            digest: digest_params(&Params::Full(varmap))?,
            reused: true,
        }))
    }

    /// `params` to `save`: this rank's own copy at a local path (ranks of one host write the
    /// same bytes, each through a rename), or rank 0's upload under an object-store URL,
    /// staged in the cache first.
    fn save(&self, params: &Params, save: &str) -> Result<()> {
        if !save.contains("://") {
            return params.save(Path::new(save));
        }
        if self.rank != 0 {
            return Ok(());
        }
        let staging =
            Path::new(&self.config.run.cache_dir).join(format!("staging-{}", std::process::id()));
        let name = match params {
            Params::Full(_) => "student.safetensors",
            Params::Lora { .. } => "student-lora",
        };
        let _ = std::fs::remove_dir_all(&staging);
        let published = params
            .save(&staging.join(name))
            .and_then(|()| saver::publish(&staging, save));
        let _ = std::fs::remove_dir_all(&staging);
        published?;
        tracing::info!(rank = self.rank, url = save, "trained model uploaded");
        Ok(())
    }

    fn anchors(&self, task: &TrainTask, student: &Params) -> Result<Option<Anchors>> {
        let Objective::Distill { teacher, .. } = &task.objective else {
            return Ok(None);
        };
        let init = task
            .init
            .as_deref()
            .context("distillation needs the pretrained student as `init`")?;
        let teacher = match &task.teacher_cache {
            Some(cache) => {
                // Logged so that tests can tell, from the worker's own log, that the teacher
                // stayed out of this process.
                tracing::info!(
                    rank = self.rank,
                    cache = cache.key,
                    "teacher answers from the cache; the teacher is not loaded"
                );
                Teacher::Cached(Box::new(teacher_cache::CachedTeacher::open(
                    task,
                    &self.device,
                )?))
            }
            None => {
                Teacher::Model(self.build_net(task.modality.other(), teacher, task.seed, true)?)
            }
        };
        let copy = std::env::var(ANCHOR_COPY_VAR).is_ok_and(|v| v == "1");
        let cached_anchors = matches!(&teacher, Teacher::Cached(cache) if cache.has_anchors());
        let replay_labels = matches!(
            task.objective,
            Objective::Distill {
                replay_labels: true,
                ..
            }
        );
        let student_before = match student {
            _ if task.replay.is_none() || task.replay_batch == 0 => Before::None,
            _ if replay_labels => Before::Labels,
            _ if cached_anchors => Before::Cached,
            Params::Lora { adapters, .. } if !net::is_adapter_dir(init) && !copy => {
                Before::StudentBase(adapters.switch().clone())
            }
            _ => Before::Copy(self.build_net(task.modality, init, task.seed, true)?),
        };
        let source = match (&student_before, student) {
            (Before::None, _) => None,
            (Before::Labels, _) => Some("the clips' labels"),
            (Before::Cached, _) => Some("the teacher cache"),
            (Before::StudentBase(_), _) => Some("student base, adapters off"),
            (Before::Copy(_), Params::Lora { .. }) => Some("a copy of the base"),
            (Before::Copy(_), Params::Full(_)) => Some("the pretrained student"),
        };
        if let Some(source) = source {
            tracing::info!(rank = self.rank, source, "replay anchor");
        }
        Ok(Some(Anchors {
            teacher,
            student_before,
        }))
    }

    /// Names to the loader the clips of this rank's steps `step..=step + PREFETCH_STEPS`
    /// (counted from the task's first, as `gradients` counts them), in the order `gradients`
    /// asks for them: the teacher's rows (where the teacher is asked: `distill`), the replay
    /// rows (the frozen student's), the student's. The loader's threads make them while this
    /// step computes; what the window leaves goes to the cache of `run.feature_cache_mb`.
    fn prefetch_steps(&self, inputs: &Inputs, task: &TrainTask, step: u64, distill: bool) {
        if task.plan.is_empty() {
            return;
        }
        let steps = task.steps - task.resume_from.unwrap_or(0).min(task.steps);
        let mut wanted = Vec::new();
        for s in step..(step + PREFETCH_STEPS + 1).min(steps) {
            let main = task.plan.samples(self.rank, self.world, s, task.batch);
            if distill {
                wanted.push((task.modality.other(), main.clone()));
            }
            wanted.push((task.modality, self.replay_samples(task, s)));
            wanted.push((task.modality, main));
        }
        inputs.prefetch(&self.config, &wanted);
    }

    /// This rank's replay rows of the `step`-th step (none without a replay plan).
    fn replay_samples(&self, task: &TrainTask, step: u64) -> Vec<Sample> {
        match &task.replay {
            Some(plan) if task.replay_batch > 0 => {
                plan.samples(self.rank, self.world, step, task.replay_batch)
            }
            _ => Vec::new(),
        }
    }

    /// Predict this rank's share of the plan's clips.
    pub fn evaluate(&mut self, task: &EvalTask) -> Result<Vec<ClipOutcome>> {
        let net = self.build_net(task.modality, &task.model, task.seed, false)?;
        self.progress.tick();
        let mine: Vec<Sample> = task
            .plan
            .pass(self.rank, self.world)
            .into_iter()
            .map(|clip| Sample { clip, epoch: 0 })
            .collect();
        let inputs = self.inputs()?;
        inputs.register_net(task.modality, &net);
        let chunk = eval_chunk(matches!(net, Net::Qwen(_)));
        let chunks: Vec<&[Sample]> = mine.chunks(chunk).collect();
        let mut out = Vec::with_capacity(mine.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let coming = &chunks[i..(i + 1 + PREFETCH_STEPS as usize).min(chunks.len())];
            inputs.prefetch(&self.config, &[(task.modality, coming.concat())]);
            let a = self.answers(&net, task.modality, chunk, task.seed, Ask::default())?;
            let probs = candle_nn::ops::softmax(&a.logits, D::Minus1)?.to_vec2::<f32>()?;
            for (i, p) in probs.iter().enumerate() {
                out.push(outcome(chunk[i].clip, &a, i, p));
            }
            self.progress.tick();
        }
        inputs.prefetch(&self.config, &[]);
        Ok(out)
    }
}

/// The parameter digest of the whole model, or of the adapters
/// (`xkd_checkpoint::digest_tensors`): the same value `xkd checkpoint digest` prints for a
/// checkpoint of these parameters.
fn digest_params(params: &Params) -> Result<String> {
    let raw = saver::raw_tensors(&params.tensors())?;
    Ok(saver::digest(&raw).sha256)
}

/// The student's parameters and the optimizer state, encoded as `student.safetensors` and
/// `optimizer.safetensors`: copied out now, so later steps cannot change what is uploaded.
fn snapshot(params: &Params, opt: &AdamW) -> Result<(bytes::Bytes, bytes::Bytes)> {
    let student = saver::encode(&saver::raw_tensors(&params.tensors())?)?;
    let optimizer = saver::encode(&saver::raw_tensors(&opt.export()?)?)?;
    Ok((student, optimizer))
}

/// Puts a checkpoint's tensors back: every parameter from `student` (names and shapes must
/// match exactly, nothing missing, nothing extra) and the optimizer state.
fn restore(params: &Params, opt: &mut AdamW, student: &[u8], optimizer: &[u8]) -> Result<()> {
    restore_params(params, student)?;
    let state = candle_core::safetensors::load_buffer(optimizer, &Device::Cpu)
        .context("reading optimizer.safetensors")?;
    opt.import(state.into_iter().collect())
        .context("optimizer.safetensors")
}

/// Every parameter from a checkpoint's `student.safetensors`: names and shapes must match
/// exactly, nothing missing, nothing extra.
fn restore_params(params: &Params, student: &[u8]) -> Result<()> {
    let mut saved = candle_core::safetensors::load_buffer(student, &Device::Cpu)
        .context("reading student.safetensors")?;
    for (name, var) in params.named() {
        let t = saved
            .remove(&name)
            .with_context(|| format!("student.safetensors lacks `{name}`"))?;
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)
            .with_context(|| format!("`{name}` in student.safetensors"))?;
    }
    if let Some(extra) = saved.keys().next() {
        bail!("student.safetensors holds `{extra}`, which this model does not have");
    }
    Ok(())
}

/// Parameters of a saved model as name -> values, for tests and digests.
pub fn load_params(path: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordinal(choice: &str, vars: &[(&str, &str)]) -> Result<Option<usize>> {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        gpu_ordinal(choice.parse().unwrap(), env)
    }

    #[test]
    fn a_worker_takes_its_local_ranks_gpu_unless_told_or_shown_one() {
        assert_eq!(ordinal("cpu", &[("LOCAL_RANK", "3")]).unwrap(), None);
        assert_eq!(ordinal("cuda:5", &[("LOCAL_RANK", "3")]).unwrap(), Some(5));
        assert_eq!(ordinal("cuda", &[]).unwrap(), Some(0));
        // Local rank: xkd run's variable first, then the launchers' names.
        let all = [
            ("XKD_LOCAL_RANK", "2"),
            ("LOCAL_RANK", "3"),
            ("SLURM_LOCALID", "4"),
        ];
        assert_eq!(ordinal("cuda", &all).unwrap(), Some(2));
        assert_eq!(ordinal("cuda", &all[1..]).unwrap(), Some(3));
        assert_eq!(ordinal("cuda", &all[2..]).unwrap(), Some(4));
        // A launcher that left one GPU visible: CUDA calls it 0 whatever the local rank.
        let one = [("CUDA_VISIBLE_DEVICES", "6"), ("SLURM_LOCALID", "1")];
        assert_eq!(ordinal("cuda", &one).unwrap(), Some(0));
        let four = [("CUDA_VISIBLE_DEVICES", "0,1,2,3"), ("SLURM_LOCALID", "1")];
        assert_eq!(ordinal("cuda", &four).unwrap(), Some(1));
        let e = format!("{:#}", ordinal("cuda", &[("LOCAL_RANK", "x")]).unwrap_err());
        assert!(e.contains("LOCAL_RANK") && e.contains("\"x\""), "{e}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0) - 0.1).abs() < 1e-12);
    }
}
