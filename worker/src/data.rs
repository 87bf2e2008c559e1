//! The dataset: an embedded synthetic "visible sound" set written to disk as real data would
//! be (wav + png + a JSONL manifest), and the loaders that read any such directory back.
//!
//! Each class has a cue strength per modality. A Clear class carries its signature well above
//! the noise; a Subtle class carries the same kind of signature a few dB closer to the noise and
//! its interferers (audio) or at lower contrast and smaller size (frames): still learnable, which
//! distillation needs, but only from more examples than the student's pretraining gave. The
//! pretraining exposure of each modality follows its cues: a modality's pretraining split keeps
//! every pretrain clip of its Clear classes but only a few of its Subtle ones. That is what the
//! manifest's `pretrain_for` records; nothing downstream reads the cue table itself.

use crate::features::{hz_to_mel, mel_to_hz};
use anyhow::{anyhow, bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use xkd_protocol::config::{DataConfig, Modality};

pub const MANIFEST_FILE: &str = "manifest.jsonl";
pub const CLASSES_FILE: &str = "classes.json";
/// The data section that generated a synthetic set, so a reused directory can be checked.
pub const GENERATOR_FILE: &str = "generator.json";
/// Split names in clip-id order.
pub const SPLITS: [&str; 4] = ["pretrain", "probe", "distill", "eval"];

/// CLIP's per-channel pixel mean and standard deviation, as the real visual model expects;
/// written exactly as published so they can be checked against it.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

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
const CLASSES: [ClassSpec; 24] = [
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

/// A loaded dataset: class names in label order and one record per clip.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub classes: Vec<String>,
    pub clips: Vec<ClipRecord>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClipRecord {
    pub id: u32,
    pub class: String,
    pub label: u32,
    pub split: String,
    /// Relative to the dataset directory.
    pub audio: String,
    /// Relative to the dataset directory, in time order.
    pub frames: Vec<String>,
    /// Modalities whose pretraining split includes this clip; empty outside "pretrain".
    #[serde(default)]
    pub pretrain_for: Vec<Modality>,
}

impl Manifest {
    pub fn audio_path(&self, clip: &ClipRecord) -> PathBuf {
        self.dir.join(&clip.audio)
    }

    pub fn frame_paths(&self, clip: &ClipRecord) -> Vec<PathBuf> {
        clip.frames.iter().map(|f| self.dir.join(f)).collect()
    }

    /// Clips of one split, in id order.
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ClipRecord> + 'a {
        self.clips.iter().filter(move |c| c.split == name)
    }
}

/// On-disk form of `classes.json`.
#[derive(Serialize, Deserialize)]
struct ClassesFile {
    classes: Vec<String>,
    /// How each class was built; only tests read it.
    #[serde(default)]
    construction: Vec<ConstructionRow>,
}

#[derive(Serialize, Deserialize)]
struct ConstructionRow {
    name: String,
    audio: Cue,
    visual: Cue,
}

// ---------------------------------------------------------------------------------------------
// ensure / load

/// Returns the dataset at `dir`, generating the synthetic set first when `dir` has none.
///
/// With `source = "manifest"` the directory must already hold a dataset. Generation writes
/// into a sibling temp directory and renames it into place, so a reader never sees a partial
/// set and two processes racing to generate both end up with the same complete one.
pub fn ensure_dataset(cfg: &DataConfig, dir: &Path) -> anyhow::Result<Manifest> {
    match cfg.source.as_str() {
        "manifest" => return load_manifest(dir),
        "synthetic" => {}
        other => bail!("data.source must be `synthetic` or `manifest`, got `{other}`"),
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

/// Reads `dir/manifest.jsonl` (and `dir/classes.json` when present). Errors name the file and
/// line. Without `classes.json` the class list is taken from the rows' labels.
pub fn load_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let clips = read_manifest_rows(&manifest_path)?;
    let classes_path = dir.join(CLASSES_FILE);
    let classes = if classes_path.is_file() {
        read_classes_file(&classes_path)?.classes
    } else {
        classes_from_rows(&clips, &manifest_path)?
    };
    check_rows(&clips, &classes, &manifest_path)?;
    Ok(Manifest {
        dir: dir.to_path_buf(),
        classes,
        clips,
    })
}

/// Each class's cues as recorded at generation time, in label order (tests only).
pub fn construction(dir: &Path) -> anyhow::Result<Vec<(String, Cue, Cue)>> {
    let path = dir.join(CLASSES_FILE);
    let file = read_classes_file(&path)?;
    if file.construction.is_empty() {
        bail!("{} has no `construction` entry", path.display());
    }
    Ok(file
        .construction
        .into_iter()
        .map(|r| (r.name, r.audio, r.visual))
        .collect())
}

fn read_manifest_rows(path: &Path) -> anyhow::Result<Vec<ClipRecord>> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut clips = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line_no = index + 1;
        let line = line.with_context(|| format!("{}:{line_no}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let clip: ClipRecord = serde_json::from_str(&line)
            .with_context(|| format!("{}:{line_no}: bad clip record", path.display()))?;
        clips.push(clip);
    }
    Ok(clips)
}

fn read_classes_file(path: &Path) -> anyhow::Result<ClassesFile> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid classes file", path.display()))
}

/// Class names by label when a manifest comes without `classes.json`; labels must be dense.
fn classes_from_rows(clips: &[ClipRecord], manifest_path: &Path) -> anyhow::Result<Vec<String>> {
    let count = clips
        .iter()
        .map(|c| c.label as usize + 1)
        .max()
        .unwrap_or(0);
    let mut names: Vec<Option<String>> = vec![None; count];
    for clip in clips {
        let slot = &mut names[clip.label as usize];
        if slot.is_none() {
            *slot = Some(clip.class.clone());
        }
    }
    names
        .into_iter()
        .enumerate()
        .map(|(label, name)| {
            name.ok_or_else(|| {
                anyhow!(
                    "{}: no clip has label {label}, and there is no {CLASSES_FILE} to name it",
                    manifest_path.display()
                )
            })
        })
        .collect()
}

/// Labels in range, names matching labels, ids unique, splits known.
fn check_rows(
    clips: &[ClipRecord],
    classes: &[String],
    manifest_path: &Path,
) -> anyhow::Result<()> {
    let mut ids = HashSet::new();
    for (row, clip) in clips.iter().enumerate() {
        let at = format!("{}:{} (clip {})", manifest_path.display(), row + 1, clip.id);
        let Some(name) = classes.get(clip.label as usize) else {
            bail!(
                "{at}: label {} but only {} classes",
                clip.label,
                classes.len()
            );
        };
        if *name != clip.class {
            bail!(
                "{at}: class `{}` but label {} is `{name}`",
                clip.class,
                clip.label
            );
        }
        if !ids.insert(clip.id) {
            bail!("{at}: duplicate clip id");
        }
        if !SPLITS.contains(&clip.split.as_str()) {
            bail!(
                "{at}: unknown split `{}` (expected one of {SPLITS:?})",
                clip.split
            );
        }
    }
    Ok(())
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
        source: "synthetic".into(),
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

// ---------------------------------------------------------------------------------------------
// audio synthesis

/// Lowest and highest partial of any class.
const PARTIAL_LOW_HZ: f64 = 150.0;
const PARTIAL_HIGH_HZ: f64 = 6000.0;
/// Per-frame signature-to-noise ratio inside the partial's own mel band, in dB, drawn per clip.
/// Clear signatures tower over everything; Subtle ones sit at the level of the background
/// sound events, so only their consistency across many clips gives them away.
const CLEAR_BAND_SNR_DB: (f64, f64) = (10.0, 16.0);
const SUBTLE_BAND_SNR_DB: (f64, f64) = (7.0, 11.0);
/// Background sound events in every clip: partials at random frequencies and times.
const INTERFERERS: usize = 3;
const INTERFERER_BAND_SNR_DB: (f64, f64) = (-4.0, 2.0);
/// How much more noise the whole spectrum holds than one band of a 40-band, n_fft 400 mel
/// spectrogram at 16 kHz (measured). Converts band SNRs into waveform amplitudes; bands are
/// equally wide in Hz below 1 kHz, and `band_equaliser` covers the widening above it.
const FULL_BAND_OVER_MEL_BAND_DB: f64 = 18.7;
/// Amplitude-modulation rates; each class takes one, the partial pair tells classes apart.
const AM_RATES_HZ: [f64; 6] = [2.0, 3.5, 5.0, 7.0, 9.5, 12.0];
const AM_DEPTH: f64 = 0.7;

/// What identifies a class by ear: a loud and a soft partial, and a tremolo rate.
#[derive(Clone, Copy, Debug)]
struct AudioSignature {
    primary_hz: f64,
    secondary_hz: f64,
    am_hz: f64,
}

/// Partials sit on a grid uniform in Slaney mels between 150 Hz and 6 kHz (logarithmic above
/// 1 kHz), so adjacent classes stay at least a mel band apart in a 40-band spectrogram. Primary
/// partials take the even grid points, one per class; secondary partials the odd points, so no
/// class's soft partial coincides with another's loud one.
fn audio_signature(label: usize) -> AudioSignature {
    let n = CLASSES.len();
    let slot = (label * 7) % n; // 7 is coprime with 24: a permutation that scatters neighbours
    let partner = (slot + 9) % n;
    AudioSignature {
        primary_hz: partial_grid(2 * slot, 2 * n),
        secondary_hz: partial_grid(2 * partner + 1, 2 * n),
        am_hz: AM_RATES_HZ[label % AM_RATES_HZ.len()],
    }
}

fn partial_grid(i: usize, points: usize) -> f64 {
    let lo = hz_to_mel(PARTIAL_LOW_HZ);
    let hi = hz_to_mel(PARTIAL_HIGH_HZ);
    mel_to_hz(lo + (hi - lo) * i as f64 / (points - 1) as f64)
}

/// Mel bands widen in proportion to frequency above 1 kHz; scaling a partial's amplitude with
/// the square root of its band's width keeps every class equally prominent in the mel domain.
fn band_equaliser(hz: f64) -> f64 {
    (hz.max(1000.0) / 1000.0).sqrt()
}

/// Peak amplitude of a sine at `hz` whose power in its mel band is `band_snr_db` above the
/// noise's power in that band.
fn partial_amplitude(noise_rms: f64, band_snr_db: f64, hz: f64) -> f64 {
    let full_band_snr_db = band_snr_db - FULL_BAND_OVER_MEL_BAND_DB;
    noise_rms * 10f64.powf(full_band_snr_db / 20.0) * std::f64::consts::SQRT_2 * band_equaliser(hz)
}

/// One sinusoidal component: frequency, amplitude, start phase, active samples, tremolo.
struct Partial {
    hz: f64,
    amplitude: f64,
    phase: f64,
    start: f64,
    end: f64,
    am_hz: f64,
    am_phase: f64,
}

fn synth_audio(cfg: &DataConfig, label: usize, cue: Cue, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let sr = cfg.sample_rate as f64;
    let samples = (cfg.clip_seconds as f64 * sr).round() as usize;
    let noise_rms = rng.random_range(0.02..0.05);
    let pink_share = rng.random_range(0.0..0.3);
    let mut wav = noise(samples, sr, noise_rms, pink_share, rng);
    let mut partials = signature_partials(label, cue, noise_rms, samples, rng);
    partials.extend(interferer_partials(noise_rms, samples, rng));
    for partial in &partials {
        add_partial(&mut wav, partial, sr);
    }
    wav
}

/// The class's two partials, jittered in frequency (+-2%), phase, level and onset.
fn signature_partials(
    label: usize,
    cue: Cue,
    noise_rms: f64,
    samples: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Partial> {
    let signature = audio_signature(label);
    let (lo, hi) = match cue {
        Cue::Clear => CLEAR_BAND_SNR_DB,
        Cue::Subtle => SUBTLE_BAND_SNR_DB,
    };
    let snr_db = rng.random_range(lo..hi);
    let start = rng.random_range(0.0..0.15) * samples as f64;
    let am_phase = rng.random_range(0.0..std::f64::consts::TAU);
    // The soft partial sits 6 dB under the loud one.
    [(signature.primary_hz, 0.0), (signature.secondary_hz, -6.0)]
        .into_iter()
        .map(|(hz, offset_db)| {
            let hz = hz * rng.random_range(0.98..1.02);
            Partial {
                hz,
                amplitude: partial_amplitude(noise_rms, snr_db + offset_db, hz),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                start,
                end: samples as f64,
                am_hz: signature.am_hz,
                am_phase,
            }
        })
        .collect()
}

/// Unrelated background events: partials anywhere in the signature range, for part of the
/// clip, with their own tremolo. They make a weak signature ambiguous in any single clip.
fn interferer_partials(noise_rms: f64, samples: usize, rng: &mut ChaCha8Rng) -> Vec<Partial> {
    let (mel_lo, mel_hi) = (hz_to_mel(PARTIAL_LOW_HZ), hz_to_mel(PARTIAL_HIGH_HZ));
    (0..INTERFERERS)
        .map(|_| {
            let hz = mel_to_hz(rng.random_range(mel_lo..mel_hi));
            let snr_db = rng.random_range(INTERFERER_BAND_SNR_DB.0..INTERFERER_BAND_SNR_DB.1);
            let length = rng.random_range(0.4..1.0) * samples as f64;
            let start = rng.random_range(0.0..=samples as f64 - length);
            Partial {
                hz,
                amplitude: partial_amplitude(noise_rms, snr_db, hz),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                start,
                end: start + length,
                am_hz: AM_RATES_HZ[rng.random_range(0..AM_RATES_HZ.len())],
                am_phase: rng.random_range(0.0..std::f64::consts::TAU),
            }
        })
        .collect()
}

fn add_partial(wav: &mut [f32], p: &Partial, sr: f64) {
    let first = p.start.max(0.0) as usize;
    let last = (p.end.ceil() as usize).min(wav.len());
    // Rotating phasors instead of a sin and a cos per sample: the generator is a hot loop, and
    // in f64 the drift over a clip is far below 16-bit resolution.
    let t0 = first as f64 / sr;
    let mut carrier = Phasor::new(std::f64::consts::TAU * p.hz * t0 + p.phase, p.hz, sr);
    let mut tremolo = Phasor::new(
        std::f64::consts::TAU * p.am_hz * t0 + p.am_phase,
        p.am_hz,
        sr,
    );
    for (i, out) in wav.iter_mut().enumerate().take(last).skip(first) {
        let gate = fade(i as f64 - p.start, sr) * fade(p.end - i as f64, sr);
        let envelope = 1.0 - 0.5 * AM_DEPTH * (1.0 - tremolo.cos());
        *out += (p.amplitude * gate * envelope * carrier.sin()) as f32;
        carrier.advance();
        tremolo.advance();
    }
}

/// `e^(i phase)`, advanced by one sample of a `hz` oscillation per step.
struct Phasor {
    re: f64,
    im: f64,
    step_re: f64,
    step_im: f64,
}

impl Phasor {
    fn new(phase: f64, hz: f64, sr: f64) -> Phasor {
        let (im, re) = phase.sin_cos();
        let (step_im, step_re) = (std::f64::consts::TAU * hz / sr).sin_cos();
        Phasor {
            re,
            im,
            step_re,
            step_im,
        }
    }

    fn sin(&self) -> f64 {
        self.im
    }

    fn cos(&self) -> f64 {
        self.re
    }

    fn advance(&mut self) {
        let re = self.re * self.step_re - self.im * self.step_im;
        self.im = self.re * self.step_im + self.im * self.step_re;
        self.re = re;
    }
}

/// A 10 ms raised-cosine ramp from 0 at the edge, so partials start and stop without clicks.
/// `inside` is the distance from the edge in samples, negative outside the partial.
fn fade(inside: f64, sr: f64) -> f64 {
    let ramp = 0.01 * sr;
    if inside < 0.0 {
        0.0
    } else if inside >= ramp {
        1.0
    } else {
        0.5 - 0.5 * (std::f64::consts::PI * inside / ramp).cos()
    }
}

/// White noise with a share of pink noise mixed in, high-passed like a recorder's rumble filter
/// (so the pink share cannot swamp the lowest bands), at the given RMS.
fn noise(samples: usize, sr: f64, rms: f64, pink_share: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let white = normals(samples, rng);
    let pink_source = normals(samples, rng);
    let pink = unit_rms(pink_filter(&pink_source));
    let (w, p) = ((1.0 - pink_share).sqrt(), pink_share.sqrt());
    let mixed: Vec<f64> = white
        .iter()
        .zip(&pink)
        .map(|(a, b)| w * a + p * b)
        .collect();
    let filtered = high_pass(
        &high_pass(&mixed, RUMBLE_CUTOFF_HZ, sr),
        RUMBLE_CUTOFF_HZ,
        sr,
    );
    unit_rms(filtered)
        .into_iter()
        .map(|x| (rms * x) as f32)
        .collect()
}

/// Cut-off of the noise's high-pass (applied twice: 12 dB per octave).
const RUMBLE_CUTOFF_HZ: f64 = 100.0;

/// First-order high-pass filter.
fn high_pass(xs: &[f64], cutoff_hz: f64, sr: f64) -> Vec<f64> {
    let rc = 1.0 / (std::f64::consts::TAU * cutoff_hz);
    let a = rc / (rc + 1.0 / sr);
    let mut out = Vec::with_capacity(xs.len());
    let (mut prev_x, mut prev_y) = (0.0, 0.0);
    for &x in xs {
        let y = a * (prev_y + x - prev_x);
        out.push(y);
        prev_x = x;
        prev_y = y;
    }
    out
}

/// Approximately 1/f noise from white noise: a sum of three one-pole low-passes at spread
/// corner frequencies plus a little of the input (a common economical pink-noise filter).
fn pink_filter(white: &[f64]) -> Vec<f64> {
    let (mut b0, mut b1, mut b2) = (0.0, 0.0, 0.0);
    white
        .iter()
        .map(|&x| {
            b0 = 0.99765 * b0 + x * 0.0990460;
            b1 = 0.96300 * b1 + x * 0.2965164;
            b2 = 0.57000 * b2 + x * 1.0526913;
            b0 + b1 + b2 + x * 0.1848
        })
        .collect()
}

fn unit_rms(mut xs: Vec<f64>) -> Vec<f64> {
    let power = xs.iter().map(|x| x * x).sum::<f64>() / xs.len().max(1) as f64;
    if power > 0.0 {
        let scale = power.sqrt().recip();
        xs.iter_mut().for_each(|x| *x *= scale);
    }
    xs
}

fn write_wav(path: &Path, sample_rate: u32, wav: &[f32]) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    for &x in wav {
        let sample = (x.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        writer
            .write_sample(sample)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    writer
        .finalize()
        .with_context(|| format!("cannot finish {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// frame synthesis

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
    Ring,
    HorizontalBar,
    Diamond,
    VerticalBar,
}

const SHAPES: [Shape; 8] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Cross,
    Shape::Ring,
    Shape::HorizontalBar,
    Shape::Diamond,
    Shape::VerticalBar,
];

/// Saturated colours, far from the grey backgrounds.
const COLOURS: [[f32; 3]; 6] = [
    [0.90, 0.15, 0.10], // red
    [0.10, 0.80, 0.20], // green
    [0.15, 0.30, 0.95], // blue
    [0.95, 0.85, 0.10], // yellow
    [0.85, 0.15, 0.80], // magenta
    [0.10, 0.85, 0.90], // cyan
];

/// Object radius as a share of the frame side.
const CLEAR_RADIUS: f32 = 0.20;
const SUBTLE_RADIUS: f32 = 0.17;
/// Share of the object's colour difference from the background that survives.
const SUBTLE_CONTRAST: f32 = 0.6;
/// Per-pixel noise standard deviation, in [0, 1] intensity.
const CLEAR_PIXEL_NOISE: f32 = 0.03;
const SUBTLE_PIXEL_NOISE: f32 = 0.06;
/// Movement per frame as a share of the frame side.
const SPEED: f32 = 0.08;

/// What identifies a class by eye: shape, colour and direction of motion.
#[derive(Clone, Copy, Debug, PartialEq)]
struct VisualSignature {
    shape: Shape,
    colour: usize,
    /// Direction in eighths of a turn; 0 = rightwards, 2 = downwards.
    direction: usize,
}

/// Classes sharing a shape (every 8th label) differ in both colour and direction, so the
/// (shape, colour, motion) triple is unique and no two classes are one attribute apart unless
/// their shapes differ.
fn visual_signature(label: usize) -> VisualSignature {
    let round = label / SHAPES.len();
    VisualSignature {
        shape: SHAPES[label % SHAPES.len()],
        colour: (label + 2 * round) % COLOURS.len(),
        direction: (label + 3 * round) % 8,
    }
}

fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    let (ax, ay) = (dx.abs(), dy.abs());
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => ax <= 0.8 * r && ay <= 0.8 * r,
        // Apex up (y grows downwards), base at 0.7 r below the centre.
        Shape::Triangle => dy >= -r && dy <= 0.7 * r && ax <= 0.6 * (dy + r),
        Shape::Cross => (ax <= 0.3 * r && ay <= r) || (ay <= 0.3 * r && ax <= r),
        Shape::Ring => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= 0.3 * r * r
        }
        Shape::HorizontalBar => ax <= r && ay <= 0.35 * r,
        Shape::Diamond => ax + ay <= r,
        Shape::VerticalBar => ay <= r && ax <= 0.35 * r,
    }
}

/// One `[H, W, 3]` u8 image per frame: background, a distractor, then the class's object.
fn synth_frames(cfg: &DataConfig, label: usize, cue: Cue, rng: &mut ChaCha8Rng) -> Vec<Vec<u8>> {
    let side = cfg.frame_size as f32;
    let background = background(rng);
    let (radius_share, contrast, pixel_noise) = match cue {
        Cue::Clear => (CLEAR_RADIUS, 1.0, CLEAR_PIXEL_NOISE),
        Cue::Subtle => (SUBTLE_RADIUS, SUBTLE_CONTRAST, SUBTLE_PIXEL_NOISE),
    };
    let class_object = moving_object(visual_signature(label), radius_share, contrast, side, rng);
    let distractor = moving_object(
        random_signature(rng),
        SUBTLE_RADIUS,
        SUBTLE_CONTRAST,
        side,
        rng,
    );
    let half_path = (cfg.frames as f32 - 1.0) / 2.0;
    (0..cfg.frames)
        .map(|t| {
            let time = t as f32 - half_path;
            let objects = [distractor.at(time), class_object.at(time)];
            render_frame(cfg.frame_size, &background, &objects, pixel_noise, rng)
        })
        .collect()
}

/// Any look at all: what an unrelated thing in the scene looks like.
fn random_signature(rng: &mut ChaCha8Rng) -> VisualSignature {
    VisualSignature {
        shape: SHAPES[rng.random_range(0..SHAPES.len())],
        colour: rng.random_range(0..COLOURS.len()),
        direction: rng.random_range(0..8),
    }
}

/// An object with a straight path through a jittered midpoint, per-clip size, brightness,
/// contrast (+-20% of the nominal) and speed.
fn moving_object(
    signature: VisualSignature,
    radius_share: f32,
    contrast: f32,
    side: f32,
    rng: &mut ChaCha8Rng,
) -> MovingObject {
    let radius = side * radius_share * rng.random_range(0.85..1.15);
    let brightness = rng.random_range(0.85..1.15);
    let colour = COLOURS[signature.colour].map(|c| (c * brightness).clamp(0.0, 1.0));
    let contrast = (contrast * rng.random_range(0.8..1.2)).min(1.0);
    let angle = signature.direction as f32 * std::f32::consts::FRAC_PI_4;
    let speed = side * SPEED * rng.random_range(0.8..1.2);
    let mid_x = side / 2.0 + side * rng.random_range(-0.12..0.12);
    let mid_y = side / 2.0 + side * rng.random_range(-0.12..0.12);
    MovingObject {
        shape: signature.shape,
        mid: (mid_x, mid_y),
        velocity: (speed * angle.cos(), speed * angle.sin()),
        radius,
        colour,
        contrast,
    }
}

struct MovingObject {
    shape: Shape,
    mid: (f32, f32),
    /// Pixels per frame.
    velocity: (f32, f32),
    radius: f32,
    colour: [f32; 3],
    contrast: f32,
}

impl MovingObject {
    /// Where it is `time` frames after the middle of the clip.
    fn at(&self, time: f32) -> Object {
        Object {
            shape: self.shape,
            cx: self.mid.0 + self.velocity.0 * time,
            cy: self.mid.1 + self.velocity.1 * time,
            radius: self.radius,
            colour: self.colour,
            contrast: self.contrast,
        }
    }
}

/// A grey with a slight tint and a gentle gradient, different per clip.
struct Background {
    base: [f32; 3],
    gradient: (f32, f32),
}

impl Background {
    fn at(&self, x: f32, y: f32, side: f32) -> [f32; 3] {
        let shade = self.gradient.0 * (x / side - 0.5) + self.gradient.1 * (y / side - 0.5);
        self.base.map(|c| c + shade)
    }
}

fn background(rng: &mut ChaCha8Rng) -> Background {
    let grey: f32 = rng.random_range(0.35..0.6);
    let base = [0; 3].map(|_| grey + rng.random_range(-0.05..0.05));
    let gradient = (rng.random_range(-0.1..0.1), rng.random_range(-0.1..0.1));
    Background { base, gradient }
}

struct Object {
    shape: Shape,
    cx: f32,
    cy: f32,
    radius: f32,
    colour: [f32; 3],
    contrast: f32,
}

/// Paints `objects` in order over the background, then adds per-pixel noise.
fn render_frame(
    size: usize,
    background: &Background,
    objects: &[Object],
    pixel_noise: f32,
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    let side = size as f32;
    let noise = normals(size * size * 3, rng);
    let mut pixels = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            // Pixel centres, so shapes are symmetric about their centre.
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut clean = background.at(px, py, side);
            for object in objects {
                if inside(object.shape, px - object.cx, py - object.cy, object.radius) {
                    for (v, target) in clean.iter_mut().zip(object.colour) {
                        *v += object.contrast * (target - *v);
                    }
                }
            }
            for v in clean {
                let value = v + pixel_noise * noise[pixels.len()] as f32;
                pixels.push((value.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    pixels
}

fn write_png(path: &Path, size: usize, rgb: &[u8]) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), size as u32, size as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Noisy frames barely compress; the fast deflate keeps generation time down.
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(rgb)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("cannot finish {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// loaders

/// Mono samples in [-1, 1]. Integer wavs are scaled by their bit depth; float wavs are read as
/// they are. Multi-channel files are refused rather than silently mixed.
pub fn load_audio(path: &Path) -> anyhow::Result<Vec<f32>> {
    let reader = hound::WavReader::open(path)
        .with_context(|| format!("cannot open wav {}", path.display()))?;
    let spec = reader.spec();
    if spec.channels != 1 {
        bail!(
            "{} has {} channels; only mono audio is supported",
            path.display(),
            spec.channels
        );
    }
    let samples: Result<Vec<f32>, hound::Error> = match spec.sample_format {
        hound::SampleFormat::Float => reader.into_samples::<f32>().collect(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect()
        }
    };
    samples.with_context(|| format!("cannot read samples of {}", path.display()))
}

/// `[T, 3, H, W]` floats normalised with CLIP's per-channel mean and std. Every frame must have
/// the same size; grey and alpha images are converted to RGB.
pub fn load_frames(paths: &[PathBuf]) -> anyhow::Result<Vec<f32>> {
    let (h, w, frames) = load_frames_rgb(paths)?;
    let mut out = Vec::with_capacity(frames.len() * 3 * h * w);
    for rgb in &frames {
        push_normalised_chw(&mut out, w, h, rgb);
    }
    Ok(out)
}

/// (height, width, one `[H, W, 3]` byte buffer per frame): the frames as decoded, for a model
/// whose own processor resizes and normalises them (Qwen2-VL). Every frame must have the same
/// size; grey and alpha images are converted to RGB.
pub fn load_frames_rgb(paths: &[PathBuf]) -> anyhow::Result<(usize, usize, Vec<Vec<u8>>)> {
    let mut out = Vec::with_capacity(paths.len());
    let mut size: Option<(usize, usize)> = None;
    for path in paths {
        let (w, h, rgb) = read_png_rgb(path)?;
        match size {
            None => size = Some((w, h)),
            Some(first) if first != (w, h) => bail!(
                "{} is {w}x{h} but earlier frames are {}x{}",
                path.display(),
                first.0,
                first.1
            ),
            Some(_) => {}
        }
        out.push(rgb);
    }
    let (w, h) = size.unwrap_or((0, 0));
    Ok((h, w, out))
}

fn push_normalised_chw(out: &mut Vec<f32>, w: usize, h: usize, rgb: &[u8]) {
    for c in 0..3 {
        for i in 0..w * h {
            let value = rgb[i * 3 + c] as f32 / 255.0;
            out.push((value - CLIP_MEAN[c]) / CLIP_STD[c]);
        }
    }
}

/// (width, height, `[H, W, 3]` bytes).
fn read_png_rgb(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a readable png", path.display()))?;
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{} is too large to decode", path.display()))?;
    let mut buf = vec![0u8; len];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("cannot decode {}", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{} stayed indexed after expansion", path.display()),
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = &buf[y * info.line_size..y * info.line_size + w * channels];
        for px in row.chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend_from_slice(&[px[0]; 3]),
                _ => rgb.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok((w, h, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::LogMel;
    use std::collections::HashMap;

    fn small_cfg(seed: u64) -> DataConfig {
        DataConfig {
            source: "synthetic".into(),
            dir: String::new(),
            seed,
            sample_rate: 16000,
            clip_seconds: 0.5,
            frames: 3,
            frame_size: 32,
            pretrain_clips: 4,
            pretrain_scarce_clips: 1,
            probe_clips: 4,
            distill_clips: 4,
            eval_clips: 4,
        }
    }

    fn generate(cfg: &DataConfig) -> (tempfile::TempDir, Manifest) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let manifest = ensure_dataset(cfg, &tmp.path().join("data")).expect("dataset");
        (tmp, manifest)
    }

    /// Every file under `root`, relative path -> bytes.
    fn tree(root: &Path) -> HashMap<PathBuf, Vec<u8>> {
        let mut files = HashMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
                    files.insert(rel, fs::read(&path).expect("read"));
                }
            }
        }
        files
    }

    #[test]
    fn class_table_has_three_interleaved_groups() {
        let table = class_table();
        assert_eq!(table.len(), 24);
        let names: HashSet<_> = table.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), 24);
        let count = |a: Cue, v: Cue| {
            table
                .iter()
                .filter(|c| c.audio == a && c.visual == v)
                .count()
        };
        assert_eq!(count(Subtle, Clear), 8);
        assert_eq!(count(Clear, Subtle), 8);
        assert_eq!(count(Clear, Clear), 8);
        // No period up to 8 lines the groups up.
        for period in 2..=8 {
            let aligned = (0..24).all(|i| {
                (i + period..24)
                    .step_by(period)
                    .all(|j| (table[i].audio, table[i].visual) == (table[j].audio, table[j].visual))
            });
            assert!(!aligned, "groups repeat with period {period}");
        }
    }

    #[test]
    fn class_signatures_are_unique() {
        let visual: Vec<_> = (0..24).map(visual_signature).collect();
        for i in 0..24 {
            for j in i + 1..24 {
                let (a, b) = (visual[i], visual[j]);
                let differing = (a.shape != b.shape) as u32
                    + (a.colour != b.colour) as u32
                    + (a.direction != b.direction) as u32;
                assert!(differing >= 1, "classes {i} and {j} look the same");
                if a.shape == b.shape {
                    assert_eq!(
                        differing, 2,
                        "classes {i} and {j} differ in one attribute only"
                    );
                }
            }
        }
        let mut pairs = HashSet::new();
        for label in 0..24 {
            let s = audio_signature(label);
            assert!((PARTIAL_LOW_HZ - 1.0..=PARTIAL_HIGH_HZ + 1.0).contains(&s.primary_hz));
            assert!((PARTIAL_LOW_HZ - 1.0..=PARTIAL_HIGH_HZ + 1.0).contains(&s.secondary_hz));
            assert!(pairs.insert((s.primary_hz.to_bits(), s.secondary_hz.to_bits())));
        }
    }

    #[test]
    fn manifest_rows_and_splits() {
        let cfg = small_cfg(7);
        let (_tmp, m) = generate(&cfg);
        let names: Vec<String> = class_table().iter().map(|c| c.name.to_string()).collect();
        assert_eq!(m.classes, names);
        assert_eq!(m.clips.len(), 24 * 16);
        for (i, clip) in m.clips.iter().enumerate() {
            assert_eq!(clip.id as usize, i, "ids are dense and in order");
            assert_eq!(m.classes[clip.label as usize], clip.class);
            assert_eq!(clip.audio, format!("audio/{}.wav", clip.id));
            assert_eq!(clip.frames.len(), 3);
            assert_eq!(clip.frames[2], format!("frames/{}_2.png", clip.id));
        }
        for split in SPLITS {
            for label in 0..24u32 {
                let n = m.split(split).filter(|c| c.label == label).count();
                assert_eq!(n, 4, "split {split} class {label}");
            }
        }
        let cues = construction(&m.dir).expect("construction");
        assert_eq!(cues.len(), 24);
        for (spec, (name, audio, visual)) in class_table().iter().zip(&cues) {
            assert_eq!(
                (spec.name, spec.audio, spec.visual),
                (name.as_str(), *audio, *visual)
            );
        }
        // The JSON keys are what other tools read.
        let first_line = fs::read_to_string(m.dir.join(MANIFEST_FILE)).expect("manifest");
        let row: serde_json::Value =
            serde_json::from_str(first_line.lines().next().expect("a row")).expect("json");
        for key in [
            "id",
            "class",
            "label",
            "split",
            "audio",
            "frames",
            "pretrain_for",
        ] {
            assert!(row.get(key).is_some(), "manifest row lacks {key}");
        }
    }

    #[test]
    fn pretrain_for_follows_cues() {
        let mut cfg = small_cfg(7);
        cfg.pretrain_clips = 5;
        cfg.pretrain_scarce_clips = 2;
        let (_tmp, m) = generate(&cfg);
        let cues = construction(&m.dir).expect("construction");
        let mut seen = [0usize; 24];
        for clip in &m.clips {
            if clip.split != "pretrain" {
                assert!(
                    clip.pretrain_for.is_empty(),
                    "clip {} outside pretrain",
                    clip.id
                );
                continue;
            }
            let k = seen[clip.label as usize];
            seen[clip.label as usize] += 1;
            let (_, audio, visual) = cues[clip.label as usize];
            for (modality, cue) in [(Modality::Audio, audio), (Modality::Visual, visual)] {
                let expected = cue == Cue::Clear || k < 2;
                assert_eq!(
                    clip.pretrain_for.contains(&modality),
                    expected,
                    "clip {} (class {}, #{k}) {modality:?}",
                    clip.id,
                    clip.class
                );
            }
        }
        // Each modality sees 5 clips of its 16 Clear classes and 2 of its 8 Subtle ones.
        for modality in [Modality::Audio, Modality::Visual] {
            let n = m
                .clips
                .iter()
                .filter(|c| c.pretrain_for.contains(&modality))
                .count();
            assert_eq!(n, 16 * 5 + 8 * 2);
        }
    }

    #[test]
    fn files_load_back() {
        let cfg = small_cfg(7);
        let (_tmp, m) = generate(&cfg);
        for clip in m.clips.iter().step_by(37) {
            let wav = load_audio(&m.audio_path(clip)).expect("wav");
            assert_eq!(wav.len(), 8000);
            assert!(wav.iter().all(|x| (-1.0..=1.0).contains(x)));
            assert!(wav.iter().any(|&x| x != 0.0));
            let frames = load_frames(&m.frame_paths(clip)).expect("frames");
            assert_eq!(frames.len(), 3 * 3 * 32 * 32);
            let lo = (0.0 - CLIP_MEAN[0]) / CLIP_STD[0] - 0.1;
            let hi = (1.0 - CLIP_MEAN[2]) / CLIP_STD[2] + 0.1;
            assert!(frames.iter().all(|x| (lo..=hi).contains(x)));
        }
        assert!(load_frames(&[]).expect("no frames").is_empty());
    }

    #[test]
    fn regeneration_is_byte_identical_and_seed_dependent() {
        let (a_dir, _) = generate(&small_cfg(7));
        let (b_dir, _) = generate(&small_cfg(7));
        let (c_dir, _) = generate(&small_cfg(8));
        let a = tree(&a_dir.path().join("data"));
        let b = tree(&b_dir.path().join("data"));
        let c = tree(&c_dir.path().join("data"));
        assert_eq!(
            a.len(),
            2 + 1 + 24 * 16 * 4,
            "manifest, classes, generator, clip files"
        );
        assert!(a == b, "same seed must give the same bytes");
        let wav = PathBuf::from("audio/5.wav");
        let png = PathBuf::from("frames/5_0.png");
        assert_ne!(a[&wav], c[&wav]);
        assert_ne!(a[&png], c[&png]);
        // No temp directory is left next to the dataset.
        let siblings = fs::read_dir(a_dir.path()).expect("read_dir").count();
        assert_eq!(siblings, 1);
    }

    #[test]
    fn second_ensure_does_not_regenerate() {
        let cfg = small_cfg(7);
        let (tmp, _) = generate(&cfg);
        let dir = tmp.path().join("data");
        let manifest = dir.join(MANIFEST_FILE);
        let before = fs::metadata(&manifest)
            .and_then(|m| m.modified())
            .expect("mtime");
        fs::write(dir.join("sentinel"), b"kept").expect("sentinel");
        let again = ensure_dataset(&cfg, &dir).expect("second ensure");
        assert_eq!(again.clips.len(), 24 * 16);
        let after = fs::metadata(&manifest)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(before, after);
        assert!(dir.join("sentinel").exists());
        // A different data section must not silently reuse this directory.
        let err = ensure_dataset(&small_cfg(8), &dir).expect_err("stale dataset");
        assert!(
            err.to_string().contains("different [data] section"),
            "{err}"
        );
        // `manifest` source only loads.
        let mut manifest_cfg = small_cfg(99);
        manifest_cfg.source = "manifest".into();
        assert_eq!(
            ensure_dataset(&manifest_cfg, &dir)
                .expect("load")
                .clips
                .len(),
            24 * 16
        );
        assert!(ensure_dataset(&manifest_cfg, &tmp.path().join("none")).is_err());
    }

    #[test]
    fn non_empty_dir_without_manifest_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        // An empty directory is fine to generate into.
        ensure_dataset(&small_cfg(1), &dir).expect("generate into empty dir");
        let other = tmp.path().join("other");
        fs::create_dir(&other).expect("mkdir");
        fs::write(other.join("x"), b"x").expect("write");
        let err = ensure_dataset(&small_cfg(1), &other).expect_err("refused");
        assert!(format!("{err:#}").contains("no manifest.jsonl"), "{err:#}");
    }

    #[test]
    fn manifest_errors_name_file_and_line() {
        let cfg = small_cfg(3);
        let (_tmp, m) = generate(&cfg);
        let path = m.dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).expect("manifest");
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"id\": 1, \"class\": oops}";
        fs::write(&path, lines.join("\n")).expect("write");
        let err = format!("{:#}", load_manifest(&m.dir).expect_err("bad row"));
        assert!(err.contains("manifest.jsonl:2"), "{err}");

        lines[1] = text.lines().next().expect("row"); // duplicate id 0
        fs::write(&path, lines.join("\n")).expect("write");
        let err = format!("{:#}", load_manifest(&m.dir).expect_err("duplicate"));
        assert!(
            err.contains("manifest.jsonl:2") && err.contains("duplicate"),
            "{err}"
        );

        let missing = load_manifest(&m.dir.join("nowhere")).expect_err("missing");
        assert!(format!("{missing:#}").contains("manifest.jsonl"));
    }

    #[test]
    fn manifest_without_classes_file_takes_names_from_rows() {
        let (_tmp, m) = generate(&small_cfg(3));
        fs::remove_file(m.dir.join(CLASSES_FILE)).expect("remove");
        let loaded = load_manifest(&m.dir).expect("load");
        assert_eq!(loaded.classes, m.classes);
        assert!(construction(&m.dir).is_err());
    }

    #[test]
    fn load_audio_rejects_stereo_and_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).expect("create");
        for _ in 0..20 {
            w.write_sample(100i16).expect("sample");
        }
        w.finalize().expect("finalize");
        let err = format!("{:#}", load_audio(&path).expect_err("stereo"));
        assert!(
            err.contains("stereo.wav") && err.contains("2 channels"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load_audio(&tmp.path().join("gone.wav")).expect_err("missing")
        );
        assert!(err.contains("gone.wav"), "{err}");
        let bad = tmp.path().join("bad.png");
        fs::write(&bad, b"not a png").expect("write");
        let err = format!("{:#}", load_frames(&[bad]).expect_err("bad png"));
        assert!(err.contains("bad.png"), "{err}");
    }

    /// Mean log-mel over time of every clip, `[40]` each.
    fn mel_profiles(m: &Manifest) -> Vec<Vec<f32>> {
        let lm = LogMel::new(16000, 400, 160, 40);
        m.clips
            .iter()
            .map(|clip| {
                let wav = load_audio(&m.audio_path(clip)).expect("wav");
                let spec = lm.compute(&wav);
                let frames = spec.len() / 40;
                let mut profile = vec![0f32; 40];
                for row in spec.chunks_exact(40) {
                    for (p, v) in profile.iter_mut().zip(row) {
                        *p += v / frames as f32;
                    }
                }
                profile
            })
            .collect()
    }

    fn correlation(a: &[f32], b: &[f32]) -> f32 {
        let mean = |x: &[f32]| x.iter().sum::<f32>() / x.len() as f32;
        let (ma, mb) = (mean(a), mean(b));
        let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
        for (x, y) in a.iter().zip(b) {
            ab += (x - ma) * (y - mb);
            aa += (x - ma) * (x - ma);
            bb += (y - mb) * (y - mb);
        }
        ab / (aa * bb).sqrt().max(1e-12)
    }

    fn argmax(xs: &[f32]) -> usize {
        (0..xs.len()).fold(0, |best, i| if xs[i] > xs[best] { i } else { best })
    }

    #[test]
    fn band_snr_calibration_holds() {
        // A partial set to 0 dB band SNR has about the noise's power in its own mel band.
        let lm = LogMel::new(16000, 400, 160, 40);
        let mut rng = clip_rng(1, 1, STREAM_AUDIO);
        let noise_only = noise(16000, 16000.0, 0.03, 0.0, &mut rng);
        let band_power = |wav: &[f32], band: usize| -> f64 {
            let spec = lm.compute(wav);
            let rows = spec.len() / 40;
            // Undo `(log10 + 4) / 4` and average linear power over frames.
            let sum: f64 = spec
                .chunks_exact(40)
                .map(|r| 10f64.powf(4.0 * r[band] as f64 - 4.0))
                .sum();
            sum / rows as f64
        };
        for hz in [300.0, 900.0, 2000.0, 5000.0] {
            let mut tone = vec![0f32; 16000];
            let partial = Partial {
                hz,
                amplitude: partial_amplitude(0.03, 0.0, hz),
                phase: 0.0,
                start: 0.0,
                end: 16000.0,
                // A tremolo this slow stays at its peak, 1, over the clip.
                am_hz: 0.001,
                am_phase: 0.0,
            };
            add_partial(&mut tone, &partial, 16000.0);
            let peak_band = argmax(&lm.compute(&tone)[..40]);
            let ratio_db =
                10.0 * (band_power(&tone, peak_band) / band_power(&noise_only, peak_band)).log10();
            eprintln!("{hz} Hz: band {peak_band}, tone / noise in band {ratio_db:.1} dB");
            assert!(ratio_db.abs() < 1.5, "{hz} Hz: {ratio_db:.1} dB");
        }
    }

    #[test]
    fn audio_classes_are_separable_and_subtle_ones_are_weaker() {
        let (_tmp, m) = generate(&small_cfg(11));
        let profiles = mel_profiles(&m);
        let cues = construction(&m.dir).expect("construction");
        let mut sums = vec![vec![0f32; 40]; 24];
        let mut counts = [0f32; 24];
        for (clip, p) in m.clips.iter().zip(&profiles) {
            let l = clip.label as usize;
            sums[l].iter_mut().zip(p).for_each(|(s, v)| *s += v);
            counts[l] += 1.0;
        }
        // Clear classes: the loud partial's band is the top of the class's mean profile, and no
        // two classes share it.
        let mut peaks = HashMap::new();
        for (label, (_, audio, _)) in cues.iter().enumerate() {
            if *audio == Cue::Clear {
                let peak = argmax(&sums[label]);
                if let Some(other) = peaks.insert(peak, label) {
                    panic!("classes {other} and {label} both peak in band {peak}");
                }
            }
        }
        // Remove what all clips share (the noise's spectral shape) so that correlations measure
        // the class signature only.
        let total = profiles.len() as f32;
        let global: Vec<f32> = (0..40)
            .map(|b| profiles.iter().map(|p| p[b]).sum::<f32>() / total)
            .collect();
        let centred =
            |x: &[f32]| -> Vec<f32> { x.iter().zip(&global).map(|(a, g)| a - g).collect() };
        // Per clip: correlation with its own class template (leave-one-out), nearest template.
        let mut score = HashMap::from([(Cue::Clear, [0f32; 3]), (Cue::Subtle, [0f32; 3])]);
        for (clip, p) in m.clips.iter().zip(&profiles) {
            let l = clip.label as usize;
            let template = |c: usize| -> Vec<f32> {
                let mean: Vec<f32> = if c == l {
                    sums[c]
                        .iter()
                        .zip(p)
                        .map(|(s, v)| (s - v) / (counts[c] - 1.0))
                        .collect()
                } else {
                    sums[c].iter().map(|s| s / counts[c]).collect()
                };
                centred(&mean)
            };
            let own = centred(p);
            let corr: Vec<f32> = (0..24).map(|c| correlation(&own, &template(c))).collect();
            let entry = score.get_mut(&cues[l].1).expect("cue");
            entry[0] += corr[l];
            entry[1] += (argmax(&corr) == l) as u32 as f32;
            entry[2] += 1.0;
        }
        let [clear_corr, clear_hits, clear_n] = score[&Cue::Clear];
        let [subtle_corr, subtle_hits, subtle_n] = score[&Cue::Subtle];
        let (clear_corr, subtle_corr) = (clear_corr / clear_n, subtle_corr / subtle_n);
        let (clear_acc, subtle_acc) = (clear_hits / clear_n, subtle_hits / subtle_n);
        eprintln!(
            "clear: corr {clear_corr:.3} nearest-template acc {clear_acc:.3}; \
             subtle: corr {subtle_corr:.3} acc {subtle_acc:.3}"
        );
        assert!(
            clear_acc > 0.95,
            "clear audio classes must be easy ({clear_acc})"
        );
        // Subtle signatures sit a few dB lower, so each clip matches its template less well;
        // they stay recognisable (the student must be able to learn them from the teacher),
        // and what makes them hard for the student is mostly scarce pretraining exposure.
        assert!(
            clear_corr > subtle_corr + 0.04,
            "subtle must be weaker ({clear_corr} vs {subtle_corr})"
        );
        assert!(
            subtle_acc > 0.5,
            "subtle classes must still carry signal ({subtle_acc})"
        );
    }

    /// Frames pooled to 8x8 per channel, minus the clip's per-channel mean (the background).
    fn pooled_frames(m: &Manifest, clip: &ClipRecord) -> Vec<f32> {
        let frames = load_frames(&m.frame_paths(clip)).expect("frames");
        let (side, cell) = (32, 4);
        let mut out = Vec::new();
        for plane in frames.chunks_exact(side * side) {
            let mean = plane.iter().sum::<f32>() / plane.len() as f32;
            for by in 0..side / cell {
                for bx in 0..side / cell {
                    let mut sum = 0.0;
                    for y in by * cell..(by + 1) * cell {
                        for x in bx * cell..(bx + 1) * cell {
                            sum += plane[y * side + x];
                        }
                    }
                    out.push(sum / (cell * cell) as f32 - mean);
                }
            }
        }
        out
    }

    /// Leave-one-out nearest-template accuracy per cue, for features `xs` of `m.clips`.
    fn template_accuracy(m: &Manifest, xs: &[Vec<f32>], cue_of: impl Fn(usize) -> Cue) -> [f32; 2] {
        let dim = xs[0].len();
        let mut sums = vec![vec![0f32; dim]; 24];
        let mut counts = [0f32; 24];
        for (clip, x) in m.clips.iter().zip(xs) {
            let l = clip.label as usize;
            sums[l].iter_mut().zip(x).for_each(|(s, v)| *s += v);
            counts[l] += 1.0;
        }
        let mut hits = [0f32; 2];
        let mut totals = [0f32; 2];
        for (clip, x) in m.clips.iter().zip(xs) {
            let l = clip.label as usize;
            let corr: Vec<f32> = (0..24)
                .map(|c| {
                    let template: Vec<f32> = if c == l {
                        sums[c]
                            .iter()
                            .zip(x)
                            .map(|(s, v)| (s - v) / (counts[c] - 1.0))
                            .collect()
                    } else {
                        sums[c].iter().map(|s| s / counts[c]).collect()
                    };
                    correlation(x, &template)
                })
                .collect();
            let slot = (cue_of(l) == Cue::Subtle) as usize;
            hits[slot] += (argmax(&corr) == l) as u32 as f32;
            totals[slot] += 1.0;
        }
        [hits[0] / totals[0], hits[1] / totals[1]]
    }

    #[test]
    fn visual_classes_are_separable_and_subtle_ones_are_weaker() {
        let (_tmp, m) = generate(&small_cfg(12));
        let cues = construction(&m.dir).expect("construction");
        let xs: Vec<Vec<f32>> = m.clips.iter().map(|c| pooled_frames(&m, c)).collect();
        let [clear_acc, subtle_acc] = template_accuracy(&m, &xs, |l| cues[l].2);
        eprintln!("visual nearest-template acc: clear {clear_acc:.3}, subtle {subtle_acc:.3}");
        // Pooling loses most of the shape and 6 colours serve 24 classes, so this crude classifier
        // stays well under what a patch model reaches; it only has to tell Clear from Subtle.
        assert!(
            clear_acc > 0.6,
            "clear visual classes must be easy ({clear_acc})"
        );
        assert!(
            clear_acc > subtle_acc + 0.08,
            "subtle must be weaker ({clear_acc} vs {subtle_acc})"
        );
        assert!(
            subtle_acc > 2.0 / 24.0,
            "subtle classes must still carry signal ({subtle_acc})"
        );
    }

    #[test]
    #[ignore = "writes a contact sheet of eval frames to the temp dir for a person to look at"]
    fn contact_sheet() {
        let (_tmp, m) = generate(&small_cfg(12));
        let (scale, side, t) = (4usize, 32usize, 3usize);
        let (w, h) = (24 * side * scale, 2 * t * side * scale);
        let mut img = vec![0u8; w * h * 3];
        for label in 0..24u32 {
            let clips: Vec<_> = m
                .split("eval")
                .filter(|c| c.label == label)
                .take(2)
                .collect();
            for (row, clip) in clips.iter().enumerate() {
                for (k, path) in m.frame_paths(clip).iter().enumerate() {
                    let (_, _, rgb) = read_png_rgb(path).expect("png");
                    for y in 0..side * scale {
                        for x in 0..side * scale {
                            let src = ((y / scale) * side + x / scale) * 3;
                            let dy = (row * t + k) * side * scale + y;
                            let dx = label as usize * side * scale + x;
                            let dst = (dy * w + dx) * 3;
                            img[dst..dst + 3].copy_from_slice(&rgb[src..src + 3]);
                        }
                    }
                }
            }
        }
        let path = std::env::temp_dir().join("xkd_contact.png");
        write_png_rect(&path, w, h, &img);
        eprintln!("wrote {}", path.display());
    }

    fn write_png_rect(path: &Path, w: usize, h: usize, rgb: &[u8]) {
        let file = fs::File::create(path).expect("create");
        let mut enc = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("header");
        wr.write_image_data(rgb).expect("data");
    }

    #[test]
    #[ignore = "generates the full default dataset; run with --ignored to time it"]
    fn default_config_generation_time() {
        let cfg = xkd_protocol::config::Config::embedded().data;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let start = std::time::Instant::now();
        let m = ensure_dataset(&cfg, &dir).expect("dataset");
        let elapsed = start.elapsed();
        let bytes: usize = tree(&dir).values().map(|v| v.len()).sum();
        let files = tree(&dir).len();
        eprintln!(
            "default dataset: {} clips in {:.2} s, {files} files, {:.1} MB of file contents",
            m.clips.len(),
            elapsed.as_secs_f64(),
            bytes as f64 / 1e6
        );
        assert_eq!(m.clips.len(), 24 * (40 + 12 + 40 + 30));
        assert!(elapsed.as_secs_f64() < 15.0);
    }
}
