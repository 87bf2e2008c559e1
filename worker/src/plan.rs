//! `xkd plan`: what one worker holds in memory while it distills and evaluates, computed from
//! the config and the models' architectures before anything runs, and whether it fits a device.
//!
//! It lives with the worker because it describes a rank: which models a distillation task
//! loads (`train::Before`), in which dtype (`frozen_dtype`), how the global batch is split
//! (`DistillConfig::rows_per_rank`), the loader's window (`train::PREFETCH_STEPS`) and the
//! evaluation chunk (`train::eval_chunk`). The per-op counts are in `arch.rs`.
//!
//! A run has phases that never overlap on a rank: a distillation step (the teacher's forward,
//! then the replay anchor's, then the student's forward and backward, all three models
//! loaded), and evaluation tasks (one model loaded, clips in chunks). The peak is the largest
//! phase. On a GPU the models, adapters and activations are device memory and the rest is the
//! process's host memory; on a CPU everything is host memory, one total.

use serde::Serialize;
use xkd_config::{Config, ConfigError, DataSource, DeviceChoice, ReplayTarget, TeacherSource};
use xkd_models::qwen::config::TextConfig;

mod arch;
mod models;
mod report;

use arch::{Adapters, Bytes, F32};
use models::{model_arch, Arch};
pub use report::text;

/// What one worker process holds besides its models and clips: the binary's pages, the
/// runtimes' threads, the allocator's arenas, candle's CPU buffers. Measured: a worker of the
/// embedded default (tiny stand-ins, `run.feature_cache_mb = 0`) peaked at 119 to 124 MiB in
/// its evaluation tasks, of which this plan counts 34 MiB (README, "Memory per worker: `xkd
/// plan`", gives the command). The same for every model size, so it is a line of the plan,
/// not a factor.
pub const PROCESS_OVERHEAD: u64 = 90 << 20;

/// What `xkd plan` is asked beyond the config.
#[derive(Debug, Clone)]
pub struct Options {
    /// Device memory to fit in, bytes; `None`: 80 GiB on a GPU, this machine's memory over the
    /// workers on a CPU.
    pub device_bytes: Option<u64>,
    /// Source video frame size (height, width) of a prepared dataset's clips, for Qwen2-VL.
    pub frame_size: (usize, usize),
}

impl Default for Options {
    fn default() -> Self {
        Options {
            device_bytes: None,
            frame_size: (360, 640),
        }
    }
}

/// Whether a distillation worker holds the teacher: not with `distill.teacher = "cached"`,
/// where the caching stage before distillation holds it alone (its own phase).
pub fn teacher_resident(config: &Config) -> bool {
    config.distill.teacher != TeacherSource::Cached
}

/// Where a part's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Memory {
    Device,
    Host,
}

/// One line of a phase: what, how much, where.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub what: String,
    pub bytes: u64,
    pub memory: Memory,
}

/// A phase of the run on one worker and everything held during it.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub parts: Vec<Part>,
    pub device_bytes: u64,
    pub host_bytes: u64,
}

impl Phase {
    fn new(name: &str, parts: Vec<Part>) -> Phase {
        let sum = |m: Memory| {
            parts
                .iter()
                .filter(|p| p.memory == m)
                .map(|p| p.bytes)
                .sum()
        };
        Phase {
            name: name.into(),
            device_bytes: sum(Memory::Device),
            host_bytes: sum(Memory::Host),
            parts,
        }
    }

    /// What must fit in the device: on a CPU, the device is host memory.
    fn on_device(&self, cpu: bool) -> u64 {
        if cpu {
            self.device_bytes + self.host_bytes
        } else {
            self.device_bytes
        }
    }
}

/// One model of the run as the plan sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub role: String,
    pub modality: String,
    pub family: String,
    pub parameters: u64,
    /// Tokens the language model sees for one question: the clip's and the prompt's.
    pub tokens: usize,
    pub clip_tokens: usize,
    /// Where the architecture came from (the directory's config.json, or a known one).
    pub architecture: String,
    /// How the prompt's tokens were counted.
    pub prompt_tokens: String,
}

/// The plan of one worker.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub device: String,
    pub workers: usize,
    pub taught_rows: usize,
    pub replay_rows: usize,
    pub teacher_resident: bool,
    pub models: Vec<ModelSummary>,
    pub phases: Vec<Phase>,
    /// The largest phase's bytes on the device (all memory on a CPU), and that phase.
    pub peak_bytes: u64,
    pub peak_phase: String,
    /// The distillation phase's device bytes without the teacher (what a cached teacher saves).
    pub distill_without_teacher_bytes: u64,
    pub capacity_bytes: u64,
    pub capacity_source: String,
    pub fits: bool,
    pub notes: Vec<String>,
}

/// Plans one worker of `config`.
pub fn plan(config: &Config, options: &Options) -> Result<Plan, ConfigError> {
    let cpu = matches!(config.run.device_choice(), DeviceChoice::Cpu);
    let b = Bytes {
        w: if cpu { F32 } else { 2 },
    };
    let student_modality = config.student_modality();
    let student = model_arch(config, student_modality, options)?;
    let teacher = model_arch(config, student_modality.other(), options)?;
    let workers = config.control.workers;
    let (taught, replay) = config.distill.rows_per_rank(workers);
    // Replay rows trained to their labels have no frozen student's answers to compute.
    let labels = config.distill.replay_target == ReplayTarget::Label;
    let anchored = if labels { 0 } else { replay };
    let lora = (student.qwen && config.lora.r > 0).then(|| Adapters {
        r: config.lora.r as u64,
        dropout: config.lora.dropout > 0.0,
        targets: config.lora.target_modules.clone(),
    });
    let resident = teacher_resident(config);
    let host = host_parts(config, &student, &teacher, taught, replay, &lora);

    let rows = Rows {
        taught,
        replay,
        anchored,
        micro_batch: config.distill.micro_batch,
    };
    let distill = distill_phase(&student, &teacher, b, rows, &lora, resident, &host);
    let no_teacher = distill_phase(&student, &teacher, b, rows, &lora, false, &host);
    let mut phases = vec![distill];
    if !resident {
        phases.push(caching_phase(
            &student,
            &teacher,
            b,
            (taught, anchored),
            &host,
        ));
    }
    phases.extend(evaluation_phases(&student, &teacher, b, &lora, &host));
    if cpu {
        phases.extend(load_phase(&student, &teacher, b, &host));
    }
    let peak = phases
        .iter()
        .max_by_key(|p| p.on_device(cpu))
        .expect("the distillation phase is always there");
    let (capacity, capacity_source) = capacity(options, cpu, workers);
    let mut notes = vec![];
    if !cpu {
        notes.push(
            "on a GPU the CUDA context, cuBLAS's workspace and the allocator's slack come on top \
             (not measured here: this plan was written without a GPU)"
                .to_string(),
        );
    }
    Ok(Plan {
        device: if cpu { "cpu".into() } else { "cuda".into() },
        workers,
        taught_rows: taught,
        replay_rows: replay,
        teacher_resident: resident,
        models: vec![summary("student", &student), summary("teacher", &teacher)],
        peak_bytes: peak.on_device(cpu),
        peak_phase: peak.name.clone(),
        distill_without_teacher_bytes: no_teacher.on_device(cpu),
        fits: peak.on_device(cpu) <= capacity,
        capacity_bytes: capacity,
        capacity_source,
        phases,
        notes,
    })
}

fn summary(role: &str, a: &Arch) -> ModelSummary {
    ModelSummary {
        role: role.into(),
        modality: a.modality.as_str().into(),
        family: a.family.into(),
        parameters: a.params,
        tokens: a.clip_tokens + a.prompt_tokens,
        clip_tokens: a.clip_tokens,
        architecture: a.source.clone(),
        prompt_tokens: a.prompt_source.clone(),
    }
}

/// The device size to fit in, and where that number came from.
fn capacity(options: &Options, cpu: bool, workers: usize) -> (u64, String) {
    if let Some(bytes) = options.device_bytes {
        return (bytes, "--device-gib".into());
    }
    if !cpu {
        return (80 << 30, "default for a GPU: 80 GiB, an H100's".into());
    }
    match mem_total() {
        Some(total) => (
            total / workers.max(1) as u64,
            format!(
                "this machine's memory ({:.1} GiB) over {workers} workers",
                gib(total)
            ),
        ),
        None => (u64::MAX, "unknown (no /proc/meminfo)".into()),
    }
}

fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub(crate) fn billions(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.1} M", n as f64 / 1e6)
    }
}

fn dtype(b: Bytes) -> &'static str {
    if b.w == F32 {
        "f32"
    } else {
        "bf16"
    }
}

fn part(what: String, bytes: u64, memory: Memory) -> Part {
    Part {
        what,
        bytes,
        memory,
    }
}

/// Parameters of the student's adapters: `r (in + out)` per targeted projection.
fn lora_params(text: &TextConfig, lora: &Adapters) -> u64 {
    let h = text.hidden_size as u64;
    let i = text.intermediate_size as u64;
    let q = (text.num_attention_heads * text.head_dim()) as u64;
    let kv = (text.num_key_value_heads * text.head_dim()) as u64;
    let shapes = [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ];
    let per_layer: u64 = shapes
        .iter()
        .filter(|(name, ..)| lora.on(name))
        .map(|(_, inp, out)| lora.r * (inp + out))
        .sum();
    text.num_hidden_layers as u64 * per_layer
}

/// Trainable parameters and the bytes each takes: the value, its gradient, the all-reduce
/// bucket it is copied into, AdamW's two moments, all f32.
fn trainable(student: &Arch, lora: &Option<Adapters>) -> (u64, String) {
    match lora {
        Some(a) => (
            lora_params(&student.text, a),
            format!(
                "LoRA r = {} on {} ({} per layer), f32",
                a.r,
                a.targets.join(", "),
                a.targets.len()
            ),
        ),
        None => (student.params, "the whole student, f32".into()),
    }
}

/// A worker's rows of a distillation step, how many of the replay rows the frozen student
/// answers (none where they are trained to their labels), and how many the student takes at
/// once (`distill.micro_batch`, 0 = all).
#[derive(Debug, Clone, Copy)]
struct Rows {
    taught: usize,
    replay: usize,
    anchored: usize,
    micro_batch: usize,
}

fn distill_phase(
    student: &Arch,
    teacher: &Arch,
    b: Bytes,
    rows: Rows,
    lora: &Option<Adapters>,
    teacher_loaded: bool,
    host: &HostParts,
) -> Phase {
    let (taught, replay, anchored) = (rows.taught as u64, rows.replay as u64, rows.anchored);
    let all = taught + replay;
    // The student's forward and backward take `micro` rows at a time; their activations and
    // the frozen operands' gradients are freed before the next micro-batch.
    let micro = match rows.micro_batch as u64 {
        0 => all,
        m => m.min(all),
    };
    let rows = micro;
    let dev = Memory::Device;
    let mut parts = vec![];
    if teacher_loaded {
        parts.push(part(
            format!(
                "teacher weights, frozen, {} ({} {}, {} parameters)",
                dtype(b),
                teacher.family,
                teacher.modality.as_str(),
                billions(teacher.params)
            ),
            teacher.params * b.w,
            dev,
        ));
    }
    let (n_train, train_what) = trainable(student, lora);
    if student.qwen {
        parts.push(part(
            format!(
                "student base weights, frozen, {} ({} {}, {} parameters)",
                dtype(b),
                student.family,
                student.modality.as_str(),
                billions(student.params)
            ),
            student.params * b.w,
            dev,
        ));
    }
    // Without the teacher loaded, its cache also holds the replay rows' anchors.
    let anchor = match (replay, student.qwen) {
        (0, _) => ("replay anchor: none (no replay rows)".to_string(), 0),
        _ if anchored == 0 => (
            "replay anchor: none (the replay rows are trained to their labels)".to_string(),
            0,
        ),
        _ if !teacher_loaded => (
            "replay anchor: the frozen student's answers, from the teacher cache".to_string(),
            0,
        ),
        (_, true) => (
            "replay anchor: the student's base with its adapters off (no copy)".to_string(),
            0,
        ),
        (_, false) => (
            format!(
                "replay anchor: the pretrained student, a frozen copy, {}",
                dtype(b)
            ),
            student.params * b.w,
        ),
    };
    parts.push(part(anchor.0, anchor.1, dev));
    // Micro-batches keep the step's running sum of gradients beside the one being computed.
    let (copies, sum) = if micro < all {
        (6, "running sum, ")
    } else {
        (5, "")
    };
    parts.push(part(
        format!(
            "trainable: {train_what}, {} parameters x (value, gradient, {sum}all-reduce \
             bucket, 2 AdamW moments)",
            billions(n_train)
        ),
        n_train * copies * F32,
        dev,
    ));

    // The three forwards of a step come one after another; the largest counts.
    let teacher_fwd = if teacher_loaded {
        teacher.frozen_peak(taught, b)
    } else {
        0
    };
    let anchored = anchored as u64;
    let anchor_fwd = if teacher_loaded {
        student.frozen_peak(anchored, b)
    } else {
        0
    };
    let graph = rows * student.graph_per_clip(b, lora.as_ref(), true);
    let frozen_grads = if student.qwen {
        // Every base linear's [B, in, out] gradient, and the LM head's.
        let t = &student.text;
        rows * t.num_hidden_layers as u64 * arch::text_layer_linear_params(t) * b.w
            + (t.hidden_size * t.vocab_size) as u64 * b.w
    } else {
        0
    };
    let layer = graph / student.layers().max(1);
    let inputs = rows * student.input_bytes;
    let tower = student.frozen_peak(rows, b) - rows * student.input_bytes;
    let student_step = inputs + (graph + frozen_grads + layer).max(tower);
    let s = student.tokens();
    let step = [
        (
            format!(
                "teacher forward: {taught} clips x {} tokens, frozen, one layer at a time",
                teacher.tokens()
            ),
            teacher_fwd,
        ),
        (
            if anchored == 0 {
                "replay anchor forward: none".to_string()
            } else if teacher_loaded {
                format!("replay anchor forward: {anchored} clips x {s} tokens, frozen")
            } else {
                "replay anchor forward: none, cached".to_string()
            },
            anchor_fwd,
        ),
        (
            format!(
                "student forward + backward: {} x {s} tokens: activations kept {:.2} \
                 GiB, gradients of frozen operands {:.2} GiB, one layer's gradients in flight \
                 {:.2} GiB, inputs {:.2} GiB",
                if micro == all {
                    format!("{all} clips")
                } else {
                    format!("{micro} of the step's {all} clips at a time (distill.micro_batch)")
                },
                gib(graph),
                gib(frozen_grads),
                gib(layer),
                gib(inputs)
            ),
            student_step,
        ),
    ];
    let (what, bytes) = step
        .into_iter()
        .max_by_key(|(_, bytes)| *bytes)
        .expect("three forwards");
    parts.push(part(
        format!("largest of a step's forwards: {what}"),
        bytes,
        dev,
    ));
    parts.extend(host.common.clone());
    parts.push(host.distill_window.clone());
    Phase::new("distillation step", parts)
}

/// The teacher cache's stage: the teacher, asked the batches a distillation step's taught
/// rows would be, and where there are anchored replay rows the frozen pretrained student too,
/// asked those. The two forwards come one after the other.
fn caching_phase(
    student: &Arch,
    teacher: &Arch,
    b: Bytes,
    (taught, replay): (usize, usize),
    host: &HostParts,
) -> Phase {
    let (taught, replay) = (taught as u64, replay as u64);
    let mut parts = vec![part(
        format!("teacher weights, frozen, {}", dtype(b)),
        teacher.params * b.w,
        Memory::Device,
    )];
    if replay > 0 {
        parts.push(part(
            format!(
                "the pretrained student's weights, frozen, {} (the replay rows' anchors)",
                dtype(b)
            ),
            student.params * b.w,
            Memory::Device,
        ));
    }
    let teacher_fwd = (
        format!(
            "teacher forward: {taught} clips x {} tokens, frozen, one layer at a time",
            teacher.tokens()
        ),
        teacher.frozen_peak(taught, b),
    );
    let anchor_fwd = (
        format!(
            "student forward: {replay} replay clips x {} tokens, frozen, one layer at a time",
            student.tokens()
        ),
        student.frozen_peak(replay, b),
    );
    let (what, bytes) = if anchor_fwd.1 > teacher_fwd.1 {
        anchor_fwd
    } else {
        teacher_fwd
    };
    parts.push(part(
        format!("larger forward: {what}"),
        bytes,
        Memory::Device,
    ));
    parts.extend(host.common.clone());
    parts.push(host.distill_window.clone());
    Phase::new("caching the teacher's answers", parts)
}

/// Evaluation (and probing): one model loaded, clips in chunks of `train::eval_chunk`.
fn evaluation_phases(
    student: &Arch,
    teacher: &Arch,
    b: Bytes,
    lora: &Option<Adapters>,
    host: &HostParts,
) -> Vec<Phase> {
    let dev = Memory::Device;
    let weights = |a: &Arch| a.params * if a.qwen { b.w } else { F32 };
    let mut out = vec![];
    let mut frozen = |role: &str, a: &Arch| {
        let mut parts = vec![
            part(
                format!("{role} weights ({})", dtype(b)),
                a.params * b.w,
                dev,
            ),
            part(
                format!(
                    "forward over {} clips x {} tokens, frozen, one layer at a time",
                    host.chunk(a),
                    a.tokens()
                ),
                a.frozen_peak(host.chunk(a), b),
                dev,
            ),
        ];
        parts.extend(host.common.clone());
        parts.push(host.eval_window(a));
        out.push(Phase::new(&format!("evaluating the {role}"), parts));
    };
    frozen("teacher", teacher);
    frozen("student before distillation", student);
    if let Some(a) = lora {
        // Outside training the adapters enter the forward detached: no graph is kept, one
        // layer's tensors at a time as in the frozen forwards (their f32 path is r wide).
        let chunk = host.chunk(student);
        let mut parts = vec![
            part(
                format!("student base weights ({}) and adapters", dtype(b)),
                weights(student) + lora_params(&student.text, a) * F32,
                dev,
            ),
            part(
                format!(
                    "forward over {chunk} clips x {} tokens, adapters detached, one layer at a \
                     time",
                    student.tokens()
                ),
                student.frozen_peak(chunk, b),
                dev,
            ),
        ];
        parts.extend(host.common.clone());
        parts.push(host.eval_window(student));
        out.push(Phase::new("evaluating the distilled student", parts));
    }
    out
}

/// On a CPU a weights file is read whole before its tensors are made (candle's
/// `safetensors::load`), then converted to f32.
fn load_phase(student: &Arch, teacher: &Arch, b: Bytes, host: &HostParts) -> Option<Phase> {
    let extra = |a: &Arch| {
        let file_total: u64 = a.files.iter().sum();
        let largest = a.files.iter().copied().max().unwrap_or(0);
        (file_total + largest).saturating_sub(a.params * b.w)
    };
    let (a, more) = [student, teacher]
        .into_iter()
        .map(|a| (a, extra(a)))
        .max_by_key(|(_, e)| *e)?;
    if more == 0 {
        return None;
    }
    let mut parts = vec![
        part(
            "both models' weights, f32".into(),
            (student.params + teacher.params) * F32,
            Memory::Device,
        ),
        part(
            format!(
                "loading the {} {}: its largest safetensors file read whole beside the tensors",
                a.family,
                a.modality.as_str()
            ),
            more,
            Memory::Host,
        ),
    ];
    parts.extend(host.common.clone());
    Some(Phase::new("loading the models", parts))
}

/// Host memory of a worker whatever it runs, and the loader's windows.
struct HostParts {
    common: Vec<Part>,
    distill_window: Part,
    window_steps: u64,
    /// The most clips of the evaluated splits a worker takes (the synthetic set's), if known.
    split_share: Option<u64>,
}

impl HostParts {
    /// Clips `a`'s evaluation forward takes at once: `train::eval_chunk`, or fewer when the
    /// synthetic set's probe and eval splits give a worker fewer.
    fn chunk(&self, a: &Arch) -> u64 {
        let most = crate::train::eval_chunk(a.qwen) as u64;
        self.split_share.map_or(most, |n| most.min(n))
    }

    fn eval_window(&self, a: &Arch) -> Part {
        let chunk = self.chunk(a);
        let bytes = self.window_steps * chunk * a.input_bytes;
        part(
            format!(
                "loader window: {} chunks of {} clips, {:.1} MiB a clip",
                self.window_steps,
                chunk,
                a.input_bytes as f64 / (1 << 20) as f64
            ),
            bytes,
            Memory::Host,
        )
    }
}

fn host_parts(
    config: &Config,
    student: &Arch,
    teacher: &Arch,
    taught: usize,
    replay: usize,
    lora: &Option<Adapters>,
) -> HostParts {
    let host = Memory::Host;
    let window_steps = crate::train::PREFETCH_STEPS + 1;
    let budget = config.run.feature_cache_mb * (1 << 20);
    let clips = dataset_clips(config);
    let (cache, cache_what) = match clips {
        Some(n) => {
            let all = n * (student.input_bytes + teacher.input_bytes);
            (
                budget.min(all),
                format!(
                    "feature cache: run.feature_cache_mb = {} MiB, or all {n} clips in both \
                     forms ({:.0} MiB) if fewer",
                    config.run.feature_cache_mb,
                    all as f64 / (1 << 20) as f64
                ),
            )
        }
        None => (
            budget,
            format!(
                "feature cache: run.feature_cache_mb = {} MiB (filled as clips are reused)",
                config.run.feature_cache_mb
            ),
        ),
    };
    let (n_train, _) = trainable(student, lora);
    let mut common = vec![
        part(
            "process: binary, runtimes, threads, allocator (measured, see README)".into(),
            PROCESS_OVERHEAD,
            host,
        ),
        part(cache_what, cache, host),
        part(
            "rank 0 only: two checkpoint snapshots being uploaded (values and moments)".into(),
            2 * n_train * 3 * F32,
            host,
        ),
    ];
    if let Some(n) = clips {
        common.push(part(
            format!("manifest: {n} clips, about 400 bytes each"),
            n * 400,
            host,
        ));
    }
    let per_step = taught as u64 * (teacher.input_bytes + student.input_bytes)
        + replay as u64 * student.input_bytes;
    HostParts {
        common,
        distill_window: part(
            format!(
                "loader window: {window_steps} steps' clips ({taught} teacher + {taught} \
                 student + {replay} replay inputs a step)"
            ),
            window_steps * per_step,
            host,
        ),
        window_steps,
        split_share: split_share(config),
    }
}

/// The most clips of the synthetic set's probe or eval split one worker takes.
fn split_share(config: &Config) -> Option<u64> {
    let d = &config.data;
    (d.source == DataSource::Synthetic).then(|| {
        let split = (d.probe_clips.max(d.eval_clips) * xkd_data::synth::class_table().len()) as u64;
        split.div_ceil(config.control.workers.max(1) as u64)
    })
}

/// Clips of the dataset when the config alone says (the synthetic set).
fn dataset_clips(config: &Config) -> Option<u64> {
    let d = &config.data;
    (d.source == DataSource::Synthetic).then(|| {
        let per_class = d.pretrain_clips + d.probe_clips + d.distill_clips + d.eval_clips;
        (per_class * xkd_data::synth::class_table().len()) as u64
    })
}

#[cfg(test)]
mod tests;
