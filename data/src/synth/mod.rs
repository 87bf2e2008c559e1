//! The embedded synthetic "visible sound" set, written to disk as real data would be (wav +
//! png + a JSONL manifest), so everything downstream reads it through the same loaders.
//!
//! Each class has a cue strength per modality. A Clear class carries its signature well above
//! the noise; a Subtle class carries the same kind of signature a few dB closer to the noise and
//! its interferers (audio) or at lower contrast and smaller size (frames): still learnable, which
//! distillation needs, but only from more examples than the student's pretraining gave. The
//! pretraining exposure of each modality follows its cues: a modality's pretraining split keeps
//! every pretrain clip of its Clear classes but only a few of its Subtle ones. That is what the
//! manifest's `pretrain_for` records; nothing downstream reads the cue table itself.
//! `audio.rs` and `visual.rs` synthesise one clip's sound and frames.

mod audio;
#[cfg(test)]
mod tests;
mod visual;

use crate::clip::{write_png, write_wav};
use crate::manifest::{
    load_manifest, ClassesFile, ClipRecord, ConstructionRow, Manifest, CLASSES_FILE, MANIFEST_FILE,
    SPLITS,
};
use anyhow::{anyhow, bail, Context};
use audio::synth_audio;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use visual::synth_frames;
use xkd_config::{DataConfig, DataSource, Modality};

/// The data section that generated a synthetic set, so a reused directory can be checked.
pub const GENERATOR_FILE: &str = "generator.json";

/// Bumped whenever generation changes what a given `[data]` section produces, so caches keyed
/// by it never serve clips from an older generator.
pub const GENERATOR_VERSION: u32 = 3;

/// How strongly a class shows in one modality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cue {
    Clear,
    Subtle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: &'static str,
    pub audio: Cue,
    pub visual: Cue,
}

impl ClassSpec {
    pub fn cue(&self, modality: Modality) -> Cue {
        match modality {
            Modality::Audio => self.audio,
            Modality::Visual => self.visual,
        }
    }
}

const fn class(name: &'static str, audio: Cue, visual: Cue) -> ClassSpec {
    ClassSpec {
        name,
        audio,
        visual,
    }
}

use Cue::{Clear, Subtle};

/// Label order. The three groups (seen more than heard, heard more than seen, both) are
/// interleaved irregularly so that neither the index nor the index modulo anything tells the
/// group.
pub(super) const CLASSES: [ClassSpec; 24] = [
    class("dog barking", Clear, Clear),
    class("skateboarding", Subtle, Clear),
    class("wind noise", Clear, Subtle),
    class("thunder", Clear, Subtle),
    class("playing badminton", Subtle, Clear),
    class("cat meowing", Clear, Clear),
    class("people eating", Subtle, Clear),
    class("playing acoustic guitar", Clear, Clear),
    class("church bell ringing", Clear, Subtle),
    class("bird chirping, tweeting", Clear, Subtle),
    class("tractor digging", Subtle, Clear),
    class("helicopter", Clear, Clear),
    class("mouse clicking", Subtle, Clear),
    class("cricket chirping", Clear, Subtle),
    class("train horning", Clear, Clear),
    class("people running", Subtle, Clear),
    class("heart sounds, heartbeat", Clear, Subtle),
    class("baby crying", Clear, Clear),
    class("sailing", Subtle, Clear),
    class("people whispering", Clear, Subtle),
    class("playing drum kit", Clear, Clear),
    class("skiing", Subtle, Clear),
    class("rooster crowing", Clear, Clear),
    class("ocean burbling", Clear, Subtle),
];

pub fn class_table() -> &'static [ClassSpec] {
    &CLASSES
}

// ---------------------------------------------------------------------------------------------
// ensure / load

/// Returns the dataset at `dir`, generating the synthetic set first when `dir` has none.
///
/// With `source = "manifest"` the directory must already hold a dataset. Generation writes
/// into a sibling temp directory and renames it into place, so a reader never sees a partial
/// set and two processes racing to generate both end up with the same complete one.
pub fn ensure_dataset(cfg: &DataConfig, dir: &Path) -> anyhow::Result<Manifest> {
    if cfg.source == DataSource::Manifest {
        return load_manifest(dir);
    }
    if dir.join(MANIFEST_FILE).is_file() {
        check_generator(cfg, dir)?;
        return load_manifest(dir);
    }
    validate(cfg)?;
    clear_empty_dir(dir)?;
    let tmp = temp_sibling(dir)?;
    if let Err(e) = generate_into(cfg, &tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("generating the dataset into {}", tmp.display())));
    }
    publish(&tmp, dir)?;
    check_generator(cfg, dir)?;
    load_manifest(dir)
}

fn validate(cfg: &DataConfig) -> anyhow::Result<()> {
    if cfg.sample_rate < 1000 {
        bail!(
            "data.sample_rate must be at least 1000, got {}",
            cfg.sample_rate
        );
    }
    if !(cfg.clip_seconds > 0.0 && cfg.clip_seconds <= 60.0) {
        bail!(
            "data.clip_seconds must be in (0, 60], got {}",
            cfg.clip_seconds
        );
    }
    if cfg.frames == 0 {
        bail!("data.frames must be at least 1");
    }
    if cfg.frame_size < 8 {
        bail!("data.frame_size must be at least 8, got {}", cfg.frame_size);
    }
    let per_class = cfg.pretrain_clips + cfg.probe_clips + cfg.distill_clips + cfg.eval_clips;
    if per_class * CLASSES.len() > u32::MAX as usize {
        bail!("too many clips for u32 ids");
    }
    Ok(())
}

/// The generating section minus the fields that do not change the content.
fn generator_record(cfg: &DataConfig) -> DataConfig {
    DataConfig {
        source: DataSource::Synthetic,
        dir: String::new(),
        ..cfg.clone()
    }
}

/// A reused directory must have been generated from the same data section; otherwise a changed
/// seed or size would silently run on stale data.
fn check_generator(cfg: &DataConfig, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(GENERATOR_FILE);
    if !path.is_file() {
        // Not ours (e.g. a converted real set): nothing to compare against.
        return Ok(());
    }
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let recorded: DataConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a data section", path.display()))?;
    if recorded != generator_record(cfg) {
        bail!(
            "{} was generated from a different [data] section ({}); remove it or point data.dir elsewhere",
            dir.display(),
            path.display()
        );
    }
    Ok(())
}

/// An empty directory (e.g. made by a caller ahead of time) does not count as a dataset.
fn clear_empty_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut entries =
        fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "{} exists but holds no {MANIFEST_FILE}; remove it to regenerate",
            dir.display()
        );
    }
    fs::remove_dir(dir).with_context(|| format!("cannot remove empty {}", dir.display()))
}

/// A fresh temp directory next to `dir`, so the final rename stays on one filesystem.
fn temp_sibling(dir: &Path) -> anyhow::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("dataset dir {} has no final component", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(
        ".{name}.tmp-{}-{nanos}-{unique}",
        std::process::id()
    ));
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

/// Renames the finished temp dir into place. Losing a race to another generator is fine: its
/// dataset is the same function of the config.
fn publish(tmp: &Path, dir: &Path) -> anyhow::Result<()> {
    match fs::rename(tmp, dir) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_dir_all(tmp);
            if dir.join(MANIFEST_FILE).is_file() {
                Ok(())
            } else {
                Err(e)
                    .with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// generation

/// Every clip's record, ids dense from 0 in (split, class, index) order.
fn plan_clips(cfg: &DataConfig) -> Vec<ClipRecord> {
    let per_split = [
        cfg.pretrain_clips,
        cfg.probe_clips,
        cfg.distill_clips,
        cfg.eval_clips,
    ];
    let mut clips = Vec::new();
    for (split, &count) in SPLITS.iter().zip(&per_split) {
        for (label, spec) in CLASSES.iter().enumerate() {
            for k in 0..count {
                let id = clips.len() as u32;
                clips.push(ClipRecord {
                    id,
                    class: spec.name.to_string(),
                    label: label as u32,
                    split: split.to_string(),
                    audio: format!("audio/{id}.wav"),
                    frames: (0..cfg.frames)
                        .map(|t| format!("frames/{id}_{t}.png"))
                        .collect(),
                    pretrain_for: pretrain_exposure(cfg, spec, split, k),
                });
            }
        }
    }
    clips
}

/// A modality pretrains on every pretrain clip of its Clear classes, and only on the first
/// `pretrain_scarce_clips` of its Subtle ones.
fn pretrain_exposure(cfg: &DataConfig, spec: &ClassSpec, split: &str, k: usize) -> Vec<Modality> {
    if split != "pretrain" {
        return Vec::new();
    }
    [Modality::Audio, Modality::Visual]
        .into_iter()
        .filter(|&m| spec.cue(m) == Cue::Clear || k < cfg.pretrain_scarce_clips)
        .collect()
}

fn generate_into(cfg: &DataConfig, root: &Path) -> anyhow::Result<()> {
    for sub in ["audio", "frames"] {
        let path = root.join(sub);
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
    }
    let clips = plan_clips(cfg);
    write_clips_parallel(cfg, root, &clips)?;
    write_classes_file(root)?;
    write_generator_file(cfg, root)?;
    // The manifest goes last: its presence marks a complete set.
    write_manifest(root, &clips)
}

/// Clip content depends only on (seed, id), so splitting the work across threads does not
/// change a byte.
fn write_clips_parallel(cfg: &DataConfig, root: &Path, clips: &[ClipRecord]) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 2);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for clip in clips.iter().skip(t).step_by(threads) {
                        write_clip(cfg, root, clip)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow!("a dataset generation thread panicked"))??;
        }
        Ok(())
    })
}

fn write_clip(cfg: &DataConfig, root: &Path, clip: &ClipRecord) -> anyhow::Result<()> {
    let spec = &CLASSES[clip.label as usize];
    let mut audio_rng = clip_rng(cfg.seed, clip.id, STREAM_AUDIO);
    let wav = synth_audio(cfg, clip.label as usize, spec.audio, &mut audio_rng);
    write_wav(&root.join(&clip.audio), cfg.sample_rate, &wav)?;
    let mut visual_rng = clip_rng(cfg.seed, clip.id, STREAM_VISUAL);
    let frames = synth_frames(cfg, clip.label as usize, spec.visual, &mut visual_rng);
    for (pixels, rel) in frames.iter().zip(&clip.frames) {
        write_png(&root.join(rel), cfg.frame_size, pixels)?;
    }
    Ok(())
}

const STREAM_AUDIO: u64 = 1;
const STREAM_VISUAL: u64 = 2;

/// One independent generator per (seed, clip, modality): audio and frames draw from separate
/// streams so changing one synthesiser leaves the other modality's bytes alone.
fn clip_rng(seed: u64, id: u32, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(id as u64 + 1)));
    rng.set_stream(stream);
    rng
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` draws of unit-variance noise, close to normal: each is the sum of four 16-bit uniforms
/// cut from one 64-bit draw (Irwin-Hall), centred and rescaled. Tails end at 3.5 sigma, which
/// noise does not miss, and it is several times cheaper than Box-Muller in this hot loop.
/// (`rand_distr` is not a dependency.)
fn normals(n: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    // Each 16-bit uniform has variance (2^32 - 1) / 12 in raw units; four of them, 4x that.
    let mean = 2.0 * 65535.0;
    let scale = 1.0 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt();
    (0..n)
        .map(|_| {
            let bits: u64 = rng.random();
            let sum =
                (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff) + (bits >> 48);
            (sum as f64 - mean) * scale
        })
        .collect()
}

fn write_classes_file(root: &Path) -> anyhow::Result<()> {
    let file = ClassesFile {
        classes: CLASSES.iter().map(|c| c.name.to_string()).collect(),
        construction: CLASSES
            .iter()
            .map(|c| ConstructionRow {
                name: c.name.to_string(),
                audio: c.audio,
                visual: c.visual,
            })
            .collect(),
    };
    let text = serde_json::to_string_pretty(&file)?;
    let path = root.join(CLASSES_FILE);
    fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn write_generator_file(cfg: &DataConfig, root: &Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&generator_record(cfg))?;
    let path = root.join(GENERATOR_FILE);
    fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn write_manifest(root: &Path, clips: &[ClipRecord]) -> anyhow::Result<()> {
    let path = root.join(MANIFEST_FILE);
    let file =
        fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for clip in clips {
        let line = serde_json::to_string(clip)?;
        writeln!(out, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}
