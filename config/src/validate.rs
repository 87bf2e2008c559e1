//! `Config::validate`: everything the config decides, checked before any process starts. An
//! error names the key and the bad value; the binary exits 2 with it.

use crate::DataSource;
use crate::{Config, ConfigError, DeviceChoice, KlOver, Modality, ModelConfig, ModelFamily};

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::BadValue {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.run
            .device
            .parse::<DeviceChoice>()
            .map_err(|message| bad("run.device", message))?;
        if !(self.collective.bucket_mb > 0.0 && self.collective.bucket_mb.is_finite()) {
            return Err(bad(
                "collective.bucket_mb",
                format!(
                    "must be a positive number of MiB, got {}",
                    self.collective.bucket_mb
                ),
            ));
        }
        if self.data.source == DataSource::Manifest && self.data.dir.is_empty() {
            return Err(bad("data.dir", "required when data.source = \"manifest\""));
        }
        if !(0.0..=1.0).contains(&self.distill.alpha) {
            return Err(bad("distill.alpha", "must lie in [0, 1]"));
        }
        if self.distill.temperature <= 0.0 {
            return Err(bad("distill.temperature", "must be positive"));
        }
        if !(0.0..1.0).contains(&self.distill.replay_fraction) {
            return Err(bad("distill.replay_fraction", "must lie in [0, 1)"));
        }
        if self.heuristic.coefficients.len() != 6 {
            return Err(bad(
                "heuristic.coefficients",
                format!(
                    "expected 6 numbers (bias and five features), got {}",
                    self.heuristic.coefficients.len()
                ),
            ));
        }
        if self.checkpoint.keep_last == 0 {
            return Err(bad(
                "checkpoint.keep_last",
                "must be at least 1 (the newest checkpoint is what a run resumes from)",
            ));
        }
        if self.control.workers == 0 {
            return Err(bad("control.workers", "must be at least 1"));
        }
        for (key, batch) in [
            ("pretrain.batch", self.pretrain.batch),
            ("distill.batch", self.distill.batch),
        ] {
            if batch == 0 || batch % self.control.workers != 0 {
                return Err(bad(
                    key,
                    format!(
                        "{batch} does not split evenly over {} workers",
                        self.control.workers
                    ),
                ));
            }
        }
        for (key, m) in [
            ("audio_model", &self.audio_model),
            ("visual_model", &self.visual_model),
        ] {
            match m.family {
                ModelFamily::Standin => {}
                ModelFamily::Qwen2 if m.dir.is_empty() => {
                    return Err(bad(
                        &format!("{key}.dir"),
                        "required when family = \"qwen2\"",
                    ))
                }
                ModelFamily::Qwen2 => continue,
            }
            if m.encoder_hidden % m.encoder_heads != 0 || m.lm_hidden % m.lm_heads != 0 {
                return Err(bad(
                    key,
                    "hidden sizes must be multiples of the head counts",
                ));
            }
            if m.lm_heads % m.lm_kv_heads != 0 {
                return Err(bad(&format!("{key}.lm_kv_heads"), "must divide lm_heads"));
            }
        }
        self.validate_qwen2()
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
