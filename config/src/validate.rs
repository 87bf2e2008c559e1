//! `Config::validate`: everything the config decides, checked before any process starts. An
//! error names the key and the bad value; the binary exits 2 with it.

use crate::DataSource;
use crate::{
    CeTarget, Config, ConfigError, DeviceChoice, KlOver, Modality, ModelConfig, ModelFamily,
    ReplayTarget, TeacherSource,
};

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        message: message.into(),
    }
}

/// `value` must be at least `min`.
fn at_least(key: &str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        return Err(bad(key, format!("must be at least {min}, got {value}")));
    }
    Ok(())
}

/// `value` must be a finite number in `[lo, hi]` (`open_lo`: in `(lo, hi]`).
fn within(key: &str, value: f64, lo: f64, hi: f64, open_lo: bool) -> Result<(), ConfigError> {
    let above = if open_lo { value > lo } else { value >= lo };
    if !(value.is_finite() && above && value <= hi) {
        let (bracket, top) = (
            if open_lo { '(' } else { '[' },
            if hi == f64::MAX {
                "inf)".to_string()
            } else {
                format!("{hi}]")
            },
        );
        return Err(bad(
            key,
            format!("must be a finite number in {bracket}{lo}, {top}, got {value}"),
        ));
    }
    Ok(())
}

/// `value` must be finite and at least 0.
fn non_negative(key: &str, value: f64) -> Result<(), ConfigError> {
    within(key, value, 0.0, f64::MAX, false)
}

/// `value` must be finite and above 0.
fn positive(key: &str, value: f64) -> Result<(), ConfigError> {
    within(key, value, 0.0, f64::MAX, true)
}

/// `divisor` must be at least 1 and divide `value`.
fn divides(key: &str, divisor: usize, value: usize, what: &str) -> Result<(), ConfigError> {
    if divisor == 0 || !value.is_multiple_of(divisor) {
        return Err(bad(
            key,
            format!("{divisor} does not divide {what} ({value})"),
        ));
    }
    Ok(())
}

/// The checkpoint store's rule for names (a run id is one path segment of every object).
fn run_id(id: &str) -> Result<(), ConfigError> {
    let ok = id.is_empty()
        || (id.len() <= 128
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    if !ok {
        return Err(bad(
            "run.run_id",
            format!("`{id}` is not a run id: 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'"),
        ));
    }
    Ok(())
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_run()?;
        // Before the batches, which must split over control.workers.
        self.validate_cluster()?;
        self.validate_data()?;
        self.validate_models()?;
        self.validate_training()?;
        self.validate_qwen2()
    }

    fn validate_run(&self) -> Result<(), ConfigError> {
        self.run
            .device
            .parse::<DeviceChoice>()
            .map_err(|message| bad("run.device", message))?;
        run_id(&self.run.run_id)?;
        if self.run.cache_dir.is_empty() {
            return Err(bad("run.cache_dir", "must name a directory"));
        }
        // Each thread is an OS thread of every worker's pool: a typo like 10000 would start
        // the workers and fail there, not here.
        const MAX_THREADS: usize = 1024;
        if self.run.feature_cache_mb > 1 << 20 {
            return Err(bad(
                "run.feature_cache_mb",
                format!("{} MiB is more than 1 TiB", self.run.feature_cache_mb),
            ));
        }
        // At least one: with none, features would be made on the training thread again.
        const MAX_LOADER_THREADS: usize = 256;
        if !(1..=MAX_LOADER_THREADS).contains(&self.run.loader_threads) {
            return Err(bad(
                "run.loader_threads",
                format!(
                    "{} is not between 1 and {MAX_LOADER_THREADS}",
                    self.run.loader_threads
                ),
            ));
        }
        if self.run.threads_per_worker > MAX_THREADS {
            return Err(bad(
                "run.threads_per_worker",
                format!("{} is more than {MAX_THREADS}", self.run.threads_per_worker),
            ));
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        if d.source == DataSource::Manifest && d.dir.is_empty() {
            return Err(bad("data.dir", "required when data.source = \"manifest\""));
        }
        if d.source == DataSource::Synthetic && d.dir.contains("://") {
            return Err(bad(
                "data.dir",
                format!(
                    "`{}` is a URL: only a prepared dataset (data.source = \"manifest\") is \
                     read from an object store; the synthetic set is generated on disk",
                    d.dir
                ),
            ));
        }
        at_least("data.sample_rate", d.sample_rate.into(), 1000)?;
        within("data.clip_seconds", d.clip_seconds.into(), 0.0, 60.0, true)?;
        at_least("data.frames", d.frames as u64, 1)?;
        at_least("data.frame_size", d.frame_size as u64, 8)?;
        // Bounds that keep one clip's decoded samples and pixels in memory.
        for (key, n, max) in [
            ("data.sample_rate", d.sample_rate as usize, 384_000),
            ("data.frames", d.frames, 1024),
            ("data.frame_size", d.frame_size, 4096),
        ] {
            if n > max {
                return Err(bad(key, format!("{n} is more than {max}")));
            }
        }
        if d.source == DataSource::Synthetic {
            for (key, n) in [
                ("data.pretrain_clips", d.pretrain_clips),
                ("data.probe_clips", d.probe_clips),
                ("data.distill_clips", d.distill_clips),
                ("data.eval_clips", d.eval_clips),
            ] {
                at_least(key, n as u64, 1)?;
                if n > 1_000_000 {
                    return Err(bad(
                        key,
                        format!("{n} clips per class is more than 1000000"),
                    ));
                }
            }
            if d.pretrain_scarce_clips > d.pretrain_clips {
                return Err(bad(
                    "data.pretrain_scarce_clips",
                    format!(
                        "{} is more than data.pretrain_clips ({})",
                        d.pretrain_scarce_clips, d.pretrain_clips
                    ),
                ));
            }
        }
        let f = &self.features;
        at_least("features.n_fft", f.n_fft as u64, 2)?;
        at_least("features.hop", f.hop as u64, 1)?;
        at_least("features.n_mels", f.n_mels as u64, 1)?;
        for (key, n, max) in [
            ("features.n_fft", f.n_fft, 1 << 20),
            ("features.hop", f.hop, 1 << 20),
            ("features.n_mels", f.n_mels, 4096),
        ] {
            if n > max {
                return Err(bad(key, format!("{n} is more than {max}")));
            }
        }
        Ok(())
    }

    fn validate_models(&self) -> Result<(), ConfigError> {
        for (key, modality) in [
            ("audio_model", Modality::Audio),
            ("visual_model", Modality::Visual),
        ] {
            let m = self.model(modality);
            if m.family == ModelFamily::Qwen2 {
                if m.dir.is_empty() {
                    return Err(bad(
                        &format!("{key}.dir"),
                        "required when family = \"qwen2\"",
                    ));
                }
                continue;
            }
            let k = |field: &str| format!("{key}.{field}");
            for (field, n) in [
                ("encoder_hidden", m.encoder_hidden),
                ("lm_hidden", m.lm_hidden),
                ("lm_intermediate", m.lm_intermediate),
            ] {
                at_least(&k(field), n as u64, 1)?;
                if n > 1 << 16 {
                    return Err(bad(
                        &k(field),
                        format!("{n} is more than 65536 for a stand-in"),
                    ));
                }
            }
            for (field, n) in [
                ("encoder_layers", m.encoder_layers),
                ("lm_layers", m.lm_layers),
            ] {
                if n > 256 {
                    return Err(bad(
                        &k(field),
                        format!("{n} layers is more than 256 for a stand-in"),
                    ));
                }
            }
            divides(
                &k("encoder_heads"),
                m.encoder_heads,
                m.encoder_hidden,
                "encoder_hidden",
            )?;
            divides(&k("lm_heads"), m.lm_heads, m.lm_hidden, "lm_hidden")?;
            divides(&k("lm_kv_heads"), m.lm_kv_heads, m.lm_heads, "lm_heads")?;
            if !(m.lm_hidden / m.lm_heads).is_multiple_of(2) {
                return Err(bad(
                    &k("lm_heads"),
                    format!(
                        "the head width lm_hidden / lm_heads = {} must be even (rotary)",
                        m.lm_hidden / m.lm_heads
                    ),
                ));
            }
            positive(&k("rope_theta"), m.rope_theta.into())?;
            match modality {
                Modality::Audio => self.validate_audio_tokens(m, &k("modality_tokens"))?,
                Modality::Visual => self.validate_patches(m, &k("patch"))?,
            }
        }
        Ok(())
    }

    /// The audio stand-in pools its encoder's frames (the log-mel's, halved by a stride-2
    /// convolution) into `modality_tokens` tokens: it needs at least one frame per token.
    fn validate_audio_tokens(&self, m: &ModelConfig, key: &str) -> Result<(), ConfigError> {
        at_least(key, m.modality_tokens as u64, 1)?;
        let f = &self.features;
        let padded = self.clip_samples() + 2 * (f.n_fft / 2);
        let mel = padded.saturating_sub(f.n_fft) / f.hop;
        let encoder = if mel == 0 { 0 } else { (mel - 1) / 2 + 1 };
        if encoder < m.modality_tokens {
            return Err(bad(
                key,
                format!(
                    "{} tokens from {encoder} encoder frames (a {} s clip, hop {}): at most {encoder}",
                    m.modality_tokens, self.data.clip_seconds, f.hop
                ),
            ));
        }
        Ok(())
    }

    /// The visual stand-in cuts frames into pairs (temporal patch 2) and `patch`-pixel squares,
    /// then merges 2 x 2 squares: the frame count must be even and the grid side even.
    fn validate_patches(&self, m: &ModelConfig, key: &str) -> Result<(), ConfigError> {
        divides(key, m.patch, self.data.frame_size, "data.frame_size")?;
        let grid = self.data.frame_size / m.patch;
        if !grid.is_multiple_of(2) {
            return Err(bad(
                key,
                format!("data.frame_size / patch = {grid} squares a side; the 2 x 2 merge needs an even number"),
            ));
        }
        if !self.data.frames.is_multiple_of(2) {
            return Err(bad(
                "data.frames",
                format!(
                    "{} frames; the visual stand-in takes them in pairs",
                    self.data.frames
                ),
            ));
        }
        Ok(())
    }

    fn validate_training(&self) -> Result<(), ConfigError> {
        for (section, t) in [
            ("pretrain", &self.pretrain),
            ("distill", &self.distill.train()),
        ] {
            let k = |field: &str| format!("{section}.{field}");
            positive(&k("lr"), t.lr)?;
            non_negative(&k("weight_decay"), t.weight_decay)?;
            non_negative(&k("grad_clip"), t.grad_clip)?;
            if section == "pretrain" {
                non_negative(&k("caption_weight"), t.caption_weight)?;
            }
            if t.batch == 0 || t.batch % self.control.workers != 0 {
                return Err(bad(
                    &k("batch"),
                    format!(
                        "{} does not split evenly over {} workers",
                        t.batch, self.control.workers
                    ),
                ));
            }
        }
        let dc = &self.distill;
        within("distill.alpha", dc.alpha, 0.0, 1.0, false)?;
        positive("distill.temperature", dc.temperature)?;
        if !(0.0..1.0).contains(&dc.replay_fraction) {
            return Err(bad(
                "distill.replay_fraction",
                format!("must lie in [0, 1), got {}", dc.replay_fraction),
            ));
        }
        if dc.replay_target == ReplayTarget::Label && dc.target == CeTarget::Teacher {
            return Err(bad(
                "distill.replay_target",
                "`label` trains the replay rows on their labels, but distill.target = \"teacher\" \
                 distils without labels: use `student` there",
            ));
        }
        non_negative("distill.caption_weight", dc.caption_weight)?;
        if dc.teacher == TeacherSource::Cached && dc.kl_over != KlOver::Options {
            return Err(bad(
                "distill.teacher",
                "`cached` needs distill.kl_over = \"options\": the cache holds the option \
                 letters' logits, not the whole vocabulary's",
            ));
        }
        if dc.cache_shard_steps == 0 {
            return Err(bad("distill.cache_shard_steps", "must be at least 1"));
        }
        let per_worker = dc.batch / self.control.workers.max(1);
        if dc.micro_batch > per_worker {
            return Err(bad(
                "distill.micro_batch",
                format!(
                    "{} is more than a worker's {per_worker} clips a step (distill.batch / \
                     control.workers); 0 runs them all at once",
                    dc.micro_batch
                ),
            ));
        }
        let h = &self.heuristic;
        within("heuristic.threshold", h.threshold, 0.0, 1.0, false)?;
        within("heuristic.teacher_floor", h.teacher_floor, 0.0, 1.0, false)?;
        if h.coefficients.len() != 6 || h.coefficients.iter().any(|c| !c.is_finite()) {
            return Err(bad(
                "heuristic.coefficients",
                format!(
                    "expected 6 finite numbers (bias and five features), got {:?}",
                    h.coefficients
                ),
            ));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        if self.checkpoint.keep_last == 0 {
            return Err(bad(
                "checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is what a run resumes from)",
            ));
        }
        positive("collective.bucket_mb", self.collective.bucket_mb)?;
        if self.collective.bucket_mb > 1024.0 * 1024.0 {
            return Err(bad(
                "collective.bucket_mb",
                format!("{} MiB is more than 1 TiB", self.collective.bucket_mb),
            ));
        }
        let c = &self.control;
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "control.listen",
                format!(
                    "`{}` is not an address (IP:port, e.g. 0.0.0.0:7733)",
                    c.listen
                ),
            ));
        }
        if !c.metrics_listen.is_empty() && c.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "control.metrics_listen",
                format!(
                    "`{}` is not an address (IP:port, e.g. 0.0.0.0:9733; empty serves no metrics)",
                    c.metrics_listen
                ),
            ));
        }
        at_least("control.workers", c.workers as u64, 1)?;
        at_least("control.heartbeat_ms", c.heartbeat_ms, 1)?;
        at_least("control.join_timeout_ms", c.join_timeout_ms, 1)?;
        at_least("control.collective_timeout_ms", c.collective_timeout_ms, 1)?;
        at_least("control.restart_window_s", c.restart_window_s, 1)?;
        if c.stall_timeout_ms <= c.heartbeat_ms {
            return Err(bad(
                "control.stall_timeout_ms",
                format!(
                    "{} must exceed control.heartbeat_ms ({}): progress is read from heartbeats",
                    c.stall_timeout_ms, c.heartbeat_ms
                ),
            ));
        }
        if c.heartbeat_timeout_ms <= c.heartbeat_ms {
            return Err(bad(
                "control.heartbeat_timeout_ms",
                format!(
                    "{} must exceed control.heartbeat_ms ({}): a worker would be lost between two beats",
                    c.heartbeat_timeout_ms, c.heartbeat_ms
                ),
            ));
        }
        Ok(())
    }

    /// What a run with a Qwen2 model needs: the KL over the option letters (the two families'
    /// vocabularies differ), no caption distillation (a stand-in objective), and a LoRA
    /// student exactly when the student is a Qwen2 model.
    fn validate_qwen2(&self) -> Result<(), ConfigError> {
        let student = self.model(self.student_modality());
        let qwen2 = |m: &ModelConfig| m.family == ModelFamily::Qwen2;
        if qwen2(&self.audio_model) || qwen2(&self.visual_model) {
            if self.distill.kl_over != KlOver::Options {
                return Err(bad(
                    "distill.kl_over",
                    "must be `options` with a qwen2 model: the families' vocabularies differ",
                ));
            }
            if self.distill.caption_weight != 0.0 {
                return Err(bad(
                    "distill.caption_weight",
                    "must be 0 with a qwen2 model (caption distillation is the stand-ins' objective)",
                ));
            }
        }
        let student_key = match self.student_modality() {
            Modality::Audio => "audio_model",
            Modality::Visual => "visual_model",
        };
        match (qwen2(student), self.lora.r) {
            (true, 0) => Err(bad(
                "lora.r",
                format!("must be at least 1: the student ({student_key}) is a qwen2 model, trained through LoRA"),
            )),
            (false, r) if r > 0 => Err(bad(
                "lora.r",
                format!("must be 0: LoRA needs a qwen2 student, and {student_key}.family is `standin`"),
            )),
            (_, r) if r > 0 => self.lora.validate().map_err(|message| {
                let (field, why) = message.split_once(": ").unwrap_or(("r", &message));
                bad(&format!("lora.{field}"), why)
            }),
            _ => Ok(()),
        }
    }
}
