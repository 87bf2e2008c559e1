//! The `config.json` of Hugging Face Qwen2-Audio and Qwen2-VL checkpoints.
//!
//! transformers writes only the keys that differ from its config classes' defaults (the
//! published Qwen2-Audio-7B `text_config`, for one, leaves out hidden size, layer and head
//! counts), so every key here falls back to the default of the class that would read it:
//! `Qwen2Config` for Qwen2-Audio's text model, `Qwen2VLConfig` for Qwen2-VL,
//! `Qwen2AudioEncoderConfig` and `Qwen2VLVisionConfig` for the towers.
//!
//! Two layouts are read, as transformers itself reads them. transformers 4.x writes Qwen2-VL's
//! text keys at the top level, its M-RoPE sections under `rope_scaling` and `rope_theta` beside
//! them; transformers 5 nests Qwen2-VL's text keys under `text_config` (Qwen2-Audio's were
//! nested already) and writes, for both families, one `rope_parameters` map holding
//! `rope_theta` and, for Qwen2-VL, `mrope_section`. Reading one layout's keys out of the other
//! would build a different model silently (class defaults standing in for the nested sizes), so
//! which level holds the text keys is decided once: `text_config` when present. transformers 5
//! also gives Qwen2-VL's vision tower a `rope_parameters` map (its rotary base, which 4.x fixed
//! at 10000). A rope type the models here do not implement (a scaled RoPE) is refused, naming
//! the key, in either layout.

use serde::Deserialize;

/// The decoder LM (Qwen2) of either family, resolved against its class defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// M-RoPE: how many of the `head_dim / 2` rotary frequencies follow the temporal, height
    /// and width position ids. `None` is plain RoPE (one position id per token).
    pub mrope_section: Option<Vec<usize>>,
}

impl TextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Structural checks a checkpoint's config must pass before a model is built from it.
    pub fn validate(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} not divisible by {h} heads",
                self.hidden_size
            ));
        }
        let kv = self.num_key_value_heads;
        if kv == 0 || !h.is_multiple_of(kv) {
            return Err(format!(
                "{h} attention heads not divisible by {kv} key/value heads"
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} is odd", self.head_dim()));
        }
        if let Some(sections) = &self.mrope_section {
            let sum: usize = sections.iter().sum();
            if sections.len() != 3 || sum != self.head_dim() / 2 {
                return Err(format!(
                    "mrope_section {sections:?} must be 3 numbers summing to head_dim / 2 = {}",
                    self.head_dim() / 2
                ));
            }
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?}: Qwen2 uses silu", self.hidden_act));
        }
        Ok(())
    }
}

/// The text keys as they appear in a config file, every one optional.
#[derive(Debug, Clone, Default, Deserialize)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    /// Written by no Qwen2 config; honoured by transformers' attention when present, so one
    /// that disagrees with `hidden_size / num_attention_heads` is refused, not ignored.
    head_dim: Option<usize>,
    /// transformers 4.x.
    rope_scaling: Option<Rope>,
    /// transformers 5.
    rope_parameters: Option<Rope>,
}

/// `rope_scaling` (4.x: no `rope_theta` inside) or `rope_parameters` (5: with it).
#[derive(Debug, Clone, Default, Deserialize)]
struct Rope {
    rope_theta: Option<f64>,
    mrope_section: Option<Vec<usize>>,
    rope_type: Option<String>,
    /// 4.x's spelling of `rope_type`; Qwen2-VL's saves write `"mrope"` here.
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl Rope {
    /// Refuses a rope type the decoders here do not implement (a scaled RoPE such as `yarn`
    /// or `linear`): ignoring it would build a model with other positions than the
    /// checkpoint's. `default` is plain RoPE; `mrope` is how Qwen2-VL's saves mark M-RoPE.
    fn check_type(&self, key: &str, allowed: &[&str]) -> Result<(), String> {
        let named = [("rope_type", &self.rope_type), ("type", &self.kind)];
        for (name, value) in named {
            if let Some(v) = value.as_deref().filter(|v| !allowed.contains(v)) {
                return Err(format!(
                    "{key}.{name} {v:?} is not supported (only {allowed:?})"
                ));
            }
        }
        Ok(())
    }
}

impl RawText {
    /// transformers 5's reading (`convert_rope_params_to_dict`): `rope_scaling` if present,
    /// else `rope_parameters`; the map's own `rope_theta` before the flat key. `level` is
    /// where the text keys were found (`""` or `"text_config."`), for the error.
    fn rope(&self, level: &str) -> Result<(Option<f64>, Option<Vec<usize>>), String> {
        let (key, rope) = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(r), _) => ("rope_scaling", r.clone()),
            (None, Some(r)) => ("rope_parameters", r.clone()),
            (None, None) => ("", Rope::default()),
        };
        rope.check_type(&format!("{level}{key}"), &["default", "mrope"])?;
        Ok((rope.rope_theta.or(self.rope_theta), rope.mrope_section))
    }

    fn resolve(self, d: TextConfig, level: &str) -> Result<TextConfig, String> {
        let heads = self.num_attention_heads.unwrap_or(d.num_attention_heads);
        let (rope_theta, mrope_section) = self.rope(level)?;
        let cfg = TextConfig {
            vocab_size: self.vocab_size.unwrap_or(d.vocab_size),
            hidden_size: self.hidden_size.unwrap_or(d.hidden_size),
            intermediate_size: self.intermediate_size.unwrap_or(d.intermediate_size),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(d.num_hidden_layers),
            num_attention_heads: heads,
            // Qwen2Config: a missing (null) kv head count means one per attention head.
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            hidden_act: self.hidden_act.unwrap_or(d.hidden_act),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(d.rms_norm_eps),
            rope_theta: rope_theta.unwrap_or(d.rope_theta),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(d.tie_word_embeddings),
            mrope_section,
        };
        match self.head_dim {
            Some(h) if cfg.num_attention_heads > 0 && h != cfg.head_dim() => Err(format!(
                "head_dim {h} differs from hidden_size {} / num_attention_heads {}: not supported",
                cfg.hidden_size, cfg.num_attention_heads
            )),
            _ => Ok(cfg),
        }
    }
}

/// `Qwen2Config()`'s defaults (transformers 4.51).
fn qwen2_defaults() -> TextConfig {
    TextConfig {
        vocab_size: 151936,
        hidden_size: 4096,
        intermediate_size: 22016,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        hidden_act: "silu".into(),
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        mrope_section: None,
    }
}

/// `Qwen2VLConfig()`'s text defaults (transformers 4.51).
fn qwen2_vl_defaults() -> TextConfig {
    TextConfig {
        vocab_size: 152064,
        hidden_size: 8192,
        intermediate_size: 29568,
        num_hidden_layers: 80,
        num_attention_heads: 64,
        num_key_value_heads: 8,
        hidden_act: "silu".into(),
        rms_norm_eps: 1e-5,
        rope_theta: 1000000.0,
        tie_word_embeddings: false,
        mrope_section: None,
    }
}

/// Qwen2-Audio's Whisper-style encoder (`Qwen2AudioEncoderConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AudioEncoderConfig {
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub activation_function: String,
    pub max_source_positions: usize,
    pub scale_embedding: bool,
}

impl Default for AudioEncoderConfig {
    fn default() -> Self {
        Self {
            num_mel_bins: 128,
            d_model: 1280,
            encoder_layers: 32,
            encoder_attention_heads: 20,
            encoder_ffn_dim: 5120,
            activation_function: "gelu".into(),
            max_source_positions: 1500,
            scale_embedding: false,
        }
    }
}

/// Qwen2-Audio (`Qwen2AudioConfig`): audio encoder, projector, Qwen2 LM.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2AudioConfig {
    pub audio: AudioEncoderConfig,
    pub text: TextConfig,
    pub audio_token_index: u32,
}

#[derive(Debug, Deserialize)]
struct RawAudio {
    #[serde(default)]
    audio_config: AudioEncoderConfig,
    #[serde(default)]
    text_config: RawText,
    #[serde(default = "default_audio_token")]
    audio_token_index: u32,
}

fn default_audio_token() -> u32 {
    151646
}

impl Qwen2AudioConfig {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawAudio = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let cfg = Self {
            audio: raw.audio_config,
            text: raw.text_config.resolve(qwen2_defaults(), "text_config.")?,
            audio_token_index: raw.audio_token_index,
        };
        cfg.text.validate()?;
        let a = &cfg.audio;
        if a.encoder_attention_heads == 0 || !a.d_model.is_multiple_of(a.encoder_attention_heads) {
            return Err(format!(
                "audio d_model {} not divisible by {} heads",
                a.d_model, a.encoder_attention_heads
            ));
        }
        if a.scale_embedding {
            return Err(
                "audio scale_embedding = true is not supported (Qwen2-Audio has false)".into(),
            );
        }
        Ok(cfg)
    }
}

/// Qwen2-VL's vision transformer (`Qwen2VLVisionConfig`). `hidden_size` is the merger's output,
/// the LM's width; `embed_dim` the ViT's own. The original checkpoints spell two keys
/// `in_chans` and `spatial_patch_size`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub hidden_size: usize,
    pub hidden_act: String,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    #[serde(alias = "in_chans")]
    pub in_channels: usize,
    #[serde(alias = "spatial_patch_size")]
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// The 2-D rotary embedding's base: fixed at 10000 by 4.x, a key of transformers 5's
    /// `vision_config.rope_parameters` (read in `Qwen2VlConfig::from_json`).
    #[serde(skip)]
    pub rope_theta: f64,
}

/// `vision_config` as a file holds it: the tower's keys, and transformers 5's rope map.
#[derive(Debug, Default, Deserialize)]
struct RawVision {
    #[serde(flatten)]
    tower: VisionConfig,
    rope_parameters: Option<Rope>,
    rope_theta: Option<f64>,
}

impl RawVision {
    /// The map's `rope_theta` before a flat one, as for the text model. The tower's rotary
    /// embedding is axial (one half of the frequencies per image axis), the only type
    /// transformers 5 accepts for it.
    fn resolve(self) -> Result<VisionConfig, String> {
        let rope = self.rope_parameters.unwrap_or_default();
        rope.check_type("vision_config.rope_parameters", &["axial"])?;
        let default = VisionConfig::default().rope_theta;
        let rope_theta = rope.rope_theta.or(self.rope_theta).unwrap_or(default);
        Ok(VisionConfig {
            rope_theta,
            ..self.tower
        })
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            depth: 32,
            embed_dim: 1280,
            hidden_size: 3584,
            hidden_act: "quick_gelu".into(),
            mlp_ratio: 4.0,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            rope_theta: 10000.0,
        }
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Length of one flattened patch: channels x temporal patch x patch x patch.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// Qwen2-VL (`Qwen2VLConfig`): the text keys at the top level (transformers 4.x) or under
/// `text_config` (5), the ViT under `vision_config`, and the special token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
}

#[derive(Debug, Deserialize)]
struct RawVl {
    #[serde(flatten)]
    top: RawText,
    text_config: Option<RawText>,
    #[serde(default)]
    vision_config: RawVision,
    #[serde(default = "default_image_token")]
    image_token_id: u32,
    #[serde(default = "default_video_token")]
    video_token_id: u32,
    #[serde(default = "default_vision_start")]
    vision_start_token_id: u32,
}

fn default_image_token() -> u32 {
    151655
}
fn default_video_token() -> u32 {
    151656
}
fn default_vision_start() -> u32 {
    151652
}

impl Qwen2VlConfig {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawVl = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // transformers 5 keeps `tie_word_embeddings` at the top level, beside `text_config`;
        // saves that nested the text keys before it put it inside. Either one ties (as
        // Qwen2VLConfig reads it).
        let tie_top = raw.top.tie_word_embeddings == Some(true);
        let nested = raw.text_config.is_some();
        let level = if nested { "text_config." } else { "" };
        let mut text = raw
            .text_config
            .unwrap_or(raw.top)
            .resolve(qwen2_vl_defaults(), level)?;
        text.tie_word_embeddings |= tie_top;
        let cfg = Self {
            text,
            vision: raw.vision_config.resolve()?,
            image_token_id: raw.image_token_id,
            video_token_id: raw.video_token_id,
            vision_start_token_id: raw.vision_start_token_id,
        };
        cfg.text.validate()?;
        if cfg.text.mrope_section.is_none() {
            return Err(if nested {
                "Qwen2-VL config has no text_config.rope_parameters.mrope_section \
                 (nor text_config.rope_scaling.mrope_section)"
            } else {
                "Qwen2-VL config has no rope_scaling.mrope_section \
                 (nor rope_parameters.mrope_section)"
            }
            .into());
        }
        let v = &cfg.vision;
        if v.num_heads == 0 || !v.embed_dim.is_multiple_of(v.num_heads) {
            return Err(format!(
                "vision embed_dim {} not divisible by {} heads",
                v.embed_dim, v.num_heads
            ));
        }
        if !v.head_dim().is_multiple_of(4) {
            return Err(format!(
                "vision head_dim {} must be a multiple of 4 (2-D rotary)",
                v.head_dim()
            ));
        }
        if v.hidden_size != cfg.text.hidden_size {
            return Err(format!(
                "vision hidden_size {} differs from the LM's {}",
                v.hidden_size, cfg.text.hidden_size
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Qwen2-Audio-7B config leaves the text model's sizes to Qwen2Config's
    /// defaults; they must come out as the 7B model's.
    #[test]
    fn missing_keys_take_the_class_defaults() {
        let json = r#"{"audio_config": {"model_type": "qwen2_audio_encoder"},
            "text_config": {"intermediate_size": 11008, "rms_norm_eps": 1e-05,
                            "vocab_size": 156032, "model_type": "qwen2"}}"#;
        let cfg = Qwen2AudioConfig::from_json(json).unwrap();
        assert_eq!(cfg.text.hidden_size, 4096);
        assert_eq!(cfg.text.num_key_value_heads, 32);
        assert_eq!(cfg.text.rope_theta, 10000.0);
        assert_eq!(cfg.text.vocab_size, 156032);
        assert_eq!(cfg.audio.d_model, 1280);
        assert_eq!(cfg.audio_token_index, 151646);
        assert_eq!(cfg.text.mrope_section, None);
    }

    #[test]
    fn qwen2_vl_reads_the_original_spelling_and_rejects_bad_sections() {
        let json = r#"{"hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "vision_config": {"in_chans": 3, "spatial_patch_size": 14, "hidden_size": 1536}}"#;
        let cfg = Qwen2VlConfig::from_json(json).unwrap();
        assert_eq!(cfg.text.mrope_section, Some(vec![16, 24, 24]));
        assert_eq!(cfg.vision.patch_len(), 3 * 2 * 14 * 14);
        assert_eq!(cfg.image_token_id, 151655);
        let bad = json.replace("[16, 24, 24]", "[16, 24, 16]");
        assert!(Qwen2VlConfig::from_json(&bad)
            .unwrap_err()
            .contains("mrope_section"));
    }

    /// transformers 5's Qwen2-VL: text keys under `text_config` (none at the top level, whose
    /// class defaults would make a 64-head, 8192-wide model), rope under `rope_parameters`,
    /// `tie_word_embeddings` at the top level.
    #[test]
    fn qwen2_vl_reads_the_transformers_5_layout() {
        let json = r#"{"tie_word_embeddings": true, "image_token_id": 7,
            "text_config": {"hidden_size": 1536, "num_attention_heads": 12,
                "num_key_value_heads": 2, "model_type": "qwen2_vl_text",
                "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 500000.0,
                                    "rope_type": "default", "type": "mrope"}},
            "vision_config": {"hidden_size": 1536, "model_type": "qwen2_vl_vision",
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}}}"#;
        let cfg = Qwen2VlConfig::from_json(json).unwrap();
        assert_eq!(cfg.text.hidden_size, 1536);
        assert_eq!(cfg.text.head_dim(), 128);
        assert_eq!(cfg.text.mrope_section, Some(vec![16, 24, 24]));
        assert_eq!(cfg.text.rope_theta, 500000.0);
        assert!(cfg.text.tie_word_embeddings);
        assert_eq!(cfg.text.rms_norm_eps, 1e-5, "Qwen2VLTextConfig's default");
        assert_eq!(cfg.image_token_id, 7);

        let no_sections = json.replace(r#""mrope_section": [16, 24, 24], "#, "");
        let err = Qwen2VlConfig::from_json(&no_sections).unwrap_err();
        assert!(
            err.contains("text_config.rope_parameters.mrope_section"),
            "{err}"
        );
    }

    /// transformers 5's Qwen2-Audio: `rope_theta` inside `rope_parameters`, which transformers
    /// prefers to a flat `rope_theta`; 4.x's `rope_scaling` wins over `rope_parameters`.
    #[test]
    fn rope_theta_is_read_where_transformers_reads_it() {
        let audio = |text: &str| {
            let json = format!(r#"{{"text_config": {{"hidden_size": 64, {text}}}}}"#);
            Qwen2AudioConfig::from_json(&json).unwrap().text
        };
        let nested = r#""rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}"#;
        assert_eq!(audio(nested).rope_theta, 250000.0);
        let both = format!(r#"{nested}, "rope_theta": 1.0"#);
        assert_eq!(audio(&both).rope_theta, 250000.0);
        assert_eq!(audio(r#""rope_theta": 5000.0"#).rope_theta, 5000.0);
        assert_eq!(audio(r#""rope_scaling": null"#).rope_theta, 10000.0);
        let vl = r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "rope_parameters": {"mrope_section": [8, 0, 0]},
            "vision_config": {"hidden_size": 64}}"#;
        let cfg = Qwen2VlConfig::from_json(vl).unwrap();
        assert_eq!(cfg.text.mrope_section, Some(vec![2, 3, 3]));
        assert_eq!(cfg.text.rope_theta, 1000000.0);
    }

    /// Neither layout's rope map: the error names the key of the layout in hand.
    #[test]
    fn a_qwen2_vl_config_without_mrope_sections_names_the_key() {
        let flat = r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 1000000.0, "vision_config": {"hidden_size": 64}}"#;
        let err = Qwen2VlConfig::from_json(flat).unwrap_err();
        assert!(err.contains("no rope_scaling.mrope_section"), "{err}");
        let nested = r#"{"text_config": {"hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2}, "vision_config": {"hidden_size": 64}}"#;
        let err = Qwen2VlConfig::from_json(nested).unwrap_err();
        assert!(
            err.contains("no text_config.rope_parameters.mrope_section"),
            "{err}"
        );
    }

    /// A scaled RoPE would give other positions than the checkpoint's: refused in both
    /// layouts, naming where the type was read; the types Qwen2 saves write are accepted.
    #[test]
    fn a_rope_type_other_than_plain_or_mrope_is_refused() {
        let audio = |rope: &str| {
            let json = format!(r#"{{"text_config": {{"hidden_size": 64, {rope}}}}}"#);
            Qwen2AudioConfig::from_json(&json)
        };
        let yarn = r#""rope_parameters": {"rope_type": "yarn", "factor": 4.0}"#;
        let err = audio(yarn).unwrap_err();
        assert!(
            err.contains(r#"text_config.rope_parameters.rope_type "yarn""#),
            "{err}"
        );
        let linear = r#""rope_scaling": {"type": "linear", "factor": 2.0}"#;
        let err = audio(linear).unwrap_err();
        assert!(
            err.contains(r#"text_config.rope_scaling.type "linear""#),
            "{err}"
        );
        assert!(audio(r#""rope_parameters": {"rope_type": "default"}"#).is_ok());

        let vl = r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"type": "dynamic", "mrope_section": [2, 3, 3]},
            "vision_config": {"hidden_size": 64}}"#;
        let err = Qwen2VlConfig::from_json(vl).unwrap_err();
        assert!(err.contains(r#"rope_scaling.type "dynamic""#), "{err}");
        assert!(Qwen2VlConfig::from_json(&vl.replace("dynamic", "mrope")).is_ok());
    }

    /// transformers 5 reads the vision tower's rotary base from its `rope_parameters`; 4.x
    /// has no key for it (10000).
    #[test]
    fn the_vision_rope_theta_is_read_from_transformers_5s_map() {
        let vl = |vision: &str| {
            let json = format!(
                r#"{{"text_config": {{"hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rope_parameters": {{"mrope_section": [2, 3, 3]}}}},
                "vision_config": {{"hidden_size": 64, {vision}}}}}"#
            );
            Qwen2VlConfig::from_json(&json)
        };
        let axial = r#""rope_parameters": {"rope_theta": 20000.0, "rope_type": "axial"}"#;
        assert_eq!(vl(axial).unwrap().vision.rope_theta, 20000.0);
        assert_eq!(vl(r#""depth": 2"#).unwrap().vision.rope_theta, 10000.0);
        let err = vl(r#""rope_parameters": {"rope_type": "default"}"#).unwrap_err();
        assert!(
            err.contains(r#"vision_config.rope_parameters.rope_type "default""#),
            "{err}"
        );
    }

    #[test]
    fn a_head_dim_other_than_the_width_over_the_heads_is_refused() {
        let json = |h: usize| {
            format!(
                r#"{{"text_config": {{"hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": {h}}}}}"#
            )
        };
        assert!(Qwen2AudioConfig::from_json(&json(16)).is_ok());
        let err = Qwen2AudioConfig::from_json(&json(32)).unwrap_err();
        assert!(err.contains("head_dim 32"), "{err}");
    }
}
