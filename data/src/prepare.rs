//! `xkd data prepare`: a list of downloaded clips in, a dataset workers read out.
//!
//! In: VGGSound's CSV (`youtube_id,start_seconds,label,split`, no header; the clip of a row is
//! `{youtube_id}_{start_seconds:06}` with extension mp4, webm or mkv in the clips directory) or
//! a generic `path,label[,split]` CSV for any other audio-visual set. Out, in one directory:
//! `clips/{id / 1000}/{id}/` per clip (`audio.wav`, 16-bit mono at `data.sample_rate`, and
//! `NN.jpg` frames), `manifest.jsonl`, `classes.json`, and `bad_clips.jsonl`, one JSON object per
//! row that was skipped, with its line and the reason.
//!
//! Decoding is the `ffmpeg` program's (Debian's `ffmpeg` package): it reads what downloads hold
//! (H.264, VP9, AV1; AAC, Opus; mp4, webm, mkv) and resamples audio with the SoX resampler.
//! Nothing here links FFmpeg, so the build never needs it; a missing program is an error that
//! names the package.
//!
//! Invariants:
//! - a clip directory exists under its final name only once it is complete: work goes into a
//!   `.partial` directory renamed at the end, so a re-run skips finished clips (their
//!   `clip.json` names the same source and settings) and redoes half-written ones;
//! - a bad clip never stops the run: each is skipped, listed with its reason and counted;
//! - the manifest, the class list and the bad-clip list are written whole (temporary file,
//!   then rename), after every clip is done;
//! - clip ids are the CSV's line numbers, so the same list gives the same ids on every run.

use crate::clip::write_wav;
use crate::manifest::{ClassesFile, ClipRecord, CLASSES_FILE, MANIFEST_FILE};
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use xkd_config::Modality;

pub const BAD_CLIPS_FILE: &str = "bad_clips.jsonl";
/// Written when a run ends: what it did, for scripts and for the next run's log.
pub const SUMMARY_FILE: &str = "prepare.json";
/// Extensions tried, in order, for a VGGSound row's clip.
const VGGSOUND_EXTENSIONS: [&str; 3] = ["mp4", "webm", "mkv"];
/// Decoded audio may fall this far short of the asked length and be zero-padded (codecs
/// trim a few milliseconds at the edges); more is a truncated or short clip.
const AUDIO_SLACK: f64 = 0.02;

/// The CSV's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    /// `youtube_id,start_seconds,label,split` (`train` or `test`), no header.
    Vggsound,
    /// `path,label[,split]`: path relative to the clips directory (or absolute); split one of
    /// `train`, `test`, `pretrain`, `probe`, `distill`, `eval` (`train` when absent).
    Paths,
}

/// The frames kept of each clip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Frames {
    /// The stand-ins' input: exactly `count` frames spread evenly over the clip, each scaled
    /// to `size` x `size` (`data.frames`, `data.frame_size`).
    Standin { count: usize, size: usize },
    /// Qwen2-VL's video input: `fps` frames per second, an even count, each resized (aspect
    /// kept) to multiples of 28 with at most `max_pixels` pixels.
    Qwen2Vl { fps: f64, max_pixels: usize },
}

/// Qwen2-VL's video defaults (qwen-vl-utils): 2 frames per second, at most 768 * 28 * 28
/// pixels a frame.
pub const QWEN2_VL_FPS: f64 = 2.0;
pub const QWEN2_VL_MAX_PIXELS: usize = 768 * 28 * 28;
const QWEN2_VL_FACTOR: usize = 28;

/// What one clip becomes; part of each finished clip's `clip.json`, so a change re-prepares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub seconds: f64,
    pub sample_rate: u32,
    pub frames: Frames,
}

/// Shares of the `train` rows that go to the pretraining, probe and distillation splits;
/// `test` rows are the eval split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainShares {
    pub pretrain: f64,
    pub probe: f64,
    pub distill: f64,
}

impl Default for TrainShares {
    fn default() -> Self {
        TrainShares {
            pretrain: 0.5,
            probe: 0.2,
            distill: 0.3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub list: PathBuf,
    pub format: ListFormat,
    pub clips: PathBuf,
    pub out: PathBuf,
    /// One class name per line, in label order; without it, the CSV's labels sorted.
    pub classes: Option<PathBuf>,
    pub settings: Settings,
    pub shares: TrainShares,
    /// Seeds which `train` rows go to which split.
    pub seed: u64,
    pub jobs: usize,
}

/// Why a row was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The CSV line has the wrong number of fields or a field that does not parse.
    Malformed,
    /// The label is not in the class list.
    UnknownLabel,
    /// An earlier line names the same clip.
    Duplicate,
    /// No file for the row.
    Missing,
    /// The file has zero bytes.
    Empty,
    /// The container ends early: its index is missing or less decodes than it declares.
    Truncated,
    NoAudio,
    NoVideo,
    /// Shorter than `seconds`.
    Short,
    /// FFmpeg cannot read it at all.
    Undecodable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnknownLabel => "unknown_label",
            Reason::Duplicate => "duplicate",
            Reason::Missing => "missing",
            Reason::Empty => "empty",
            Reason::Truncated => "truncated",
            Reason::NoAudio => "no_audio",
            Reason::NoVideo => "no_video",
            Reason::Short => "short",
            Reason::Undecodable => "undecodable",
        }
    }
}

/// One line of `bad_clips.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadClip {
    /// Line of the CSV (1-based).
    pub line: u64,
    /// The clip file, or the row's text when it names none.
    pub clip: String,
    pub reason: Reason,
    pub detail: String,
}

/// What a run did; printed and written to `prepare.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub rows: usize,
    /// Clips prepared by this run.
    pub prepared: usize,
    /// Clips a previous run had finished, kept.
    pub kept: usize,
    pub bad: BTreeMap<Reason, usize>,
    pub classes: usize,
    pub seconds: f64,
    pub jobs: usize,
    /// Bytes of the source files of this run's prepared clips, and of what they became.
    pub source_bytes: u64,
    pub prepared_bytes: u64,
}

impl Summary {
    pub fn bad_total(&self) -> usize {
        self.bad.values().sum()
    }
}

/// Progress as clips finish: (done, total).
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// A row that names a clip, before its file is looked at.
#[derive(Debug, Clone)]
struct Row {
    line: u64,
    /// The file (VGGSound: the first extension found, else the mp4 name).
    path: PathBuf,
    /// How the clip is named in `clip.json` and `bad_clips.jsonl`: relative to `--clips`.
    name: String,
    label: String,
    split: String,
}

/// Prepares every row of `opts.list`; see the module doc.
pub fn prepare(opts: &Options, progress: Progress) -> Result<Summary> {
    check_ffmpeg()?;
    let started = Instant::now();
    let (rows, mut bad) = read_rows(opts)?;
    let classes = class_list(opts, &rows)?;
    let labels: HashMap<&str, u32> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect();
    let mut good = Vec::with_capacity(rows.len());
    for row in rows {
        if labels.contains_key(row.label.as_str()) {
            good.push(row);
        } else {
            bad.push(BadClip {
                line: row.line,
                clip: row.name.clone(),
                reason: Reason::UnknownLabel,
                detail: format!("label `{}` is not in the class list", row.label),
            });
        }
    }
    fs::create_dir_all(opts.out.join("clips"))
        .with_context(|| format!("cannot create {}", opts.out.display()))?;

    let total = good.len();
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel::<(usize, Result<Done, BadClip>)>();
    let mut outcomes: Vec<Option<Result<Done, BadClip>>> = vec![None; total];
    let jobs = opts.jobs.max(1);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..jobs.min(total.max(1)) {
            let tx = tx.clone();
            let (next, good) = (&next, &good);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(row) = good.get(i) else { break };
                let outcome = prepare_clip(opts, row);
                if tx.send((i, outcome)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (done, (i, outcome)) in rx.iter().enumerate() {
            outcomes[i] = Some(outcome);
            progress(done + 1, total);
        }
        Ok(())
    })?;

    let mut summary = Summary {
        rows: total + bad.len(),
        classes: classes.len(),
        jobs,
        ..Summary::default()
    };
    let mut manifest = Vec::with_capacity(total);
    for (row, outcome) in good.iter().zip(outcomes) {
        match outcome.context("a preparing thread stopped early")? {
            Ok(done) => {
                if done.kept {
                    summary.kept += 1;
                } else {
                    summary.prepared += 1;
                    summary.source_bytes += done.source_bytes;
                    summary.prepared_bytes += done.prepared_bytes;
                }
                manifest.push(ClipRecord {
                    id: row.line as u32,
                    class: row.label.clone(),
                    label: labels[row.label.as_str()],
                    split: row.split.clone(),
                    audio: done.audio,
                    frames: done.frames,
                    pretrain_for: if row.split == "pretrain" {
                        vec![Modality::Audio, Modality::Visual]
                    } else {
                        Vec::new()
                    },
                });
            }
            Err(b) => bad.push(b),
        }
    }
    bad.sort_by_key(|b| b.line);
    for b in &bad {
        *summary.bad.entry(b.reason).or_default() += 1;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    write_outputs(&opts.out, &classes, &manifest, &bad, &summary)?;
    Ok(summary)
}

/// Refuses to start without `ffmpeg` and `ffprobe`, naming the package that has them.
pub fn check_ffmpeg() -> Result<()> {
    for program in ["ffmpeg", "ffprobe"] {
        match Command::new(program).arg("-version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => bail!(
                "`{program} -version` failed ({}); reinstall Debian's `ffmpeg` package",
                out.status
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "`{program}` is not installed: xkd data prepare decodes clips with FFmpeg; \
                 install Debian's `ffmpeg` package (apt-get install ffmpeg)"
            ),
            Err(e) => bail!("cannot run `{program}`: {e}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// the list

fn read_rows(opts: &Options) -> Result<(Vec<Row>, Vec<BadClip>)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(&opts.list)
        .with_context(|| format!("cannot open {}", opts.list.display()))?;
    let (mut rows, mut bad) = (Vec::new(), Vec::new());
    let mut seen: HashMap<PathBuf, u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A broken record (bad UTF-8, say) is one bad row; the reader goes on after it.
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(e).with_context(|| format!("cannot read {}", opts.list.display()));
                }
                bad.push(BadClip {
                    line,
                    clip: String::new(),
                    reason: Reason::Malformed,
                    detail: e.to_string(),
                });
                continue;
            }
        }
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let parsed = match opts.format {
            ListFormat::Vggsound => vggsound_row(&record, &opts.clips),
            ListFormat::Paths => paths_row(&record, &opts.clips),
        };
        let (path, name, label, split) = match parsed {
            Ok(row) => row,
            Err(detail) => {
                bad.push(BadClip {
                    line,
                    clip: record.iter().collect::<Vec<_>>().join(","),
                    reason: Reason::Malformed,
                    detail,
                });
                continue;
            }
        };
        if let Some(first) = seen.get(&path) {
            bad.push(BadClip {
                line,
                clip: name,
                reason: Reason::Duplicate,
                detail: format!("line {first} names the same clip"),
            });
            continue;
        }
        seen.insert(path.clone(), line);
        let split = match split.as_deref() {
            None | Some("train") => train_split(&name, opts.seed, opts.shares).to_string(),
            Some("test") => "eval".to_string(),
            Some(s) => s.to_string(),
        };
        rows.push(Row {
            line,
            path,
            name,
            label,
            split,
        });
    }
    Ok((rows, bad))
}

type Parsed = (PathBuf, String, String, Option<String>);

fn vggsound_row(record: &csv::StringRecord, clips: &Path) -> Result<Parsed, String> {
    if record.len() != 4 {
        return Err(format!(
            "{} fields; a VGGSound row is youtube_id,start_seconds,label,split",
            record.len()
        ));
    }
    let (id, start, label, split) = (&record[0], &record[1], &record[2], &record[3]);
    if id.is_empty() || id.contains(['/', '\\']) {
        return Err(format!("`{id}` is not a YouTube id"));
    }
    let start: u64 = start
        .trim()
        .parse()
        .map_err(|_| format!("start_seconds `{start}` is not a whole number"))?;
    if !matches!(split.trim(), "train" | "test") {
        return Err(format!("split `{split}` is neither train nor test"));
    }
    let stem = format!("{id}_{start:06}");
    let found = VGGSOUND_EXTENSIONS
        .iter()
        .map(|ext| format!("{stem}.{ext}"))
        .find(|name| clips.join(name).exists());
    let name = found.unwrap_or_else(|| format!("{stem}.mp4"));
    Ok((
        clips.join(&name),
        name,
        label.trim().to_string(),
        Some(split.trim().to_string()),
    ))
}

fn paths_row(record: &csv::StringRecord, clips: &Path) -> Result<Parsed, String> {
    if !(2..=3).contains(&record.len()) {
        return Err(format!(
            "{} fields; a row is path,label[,split]",
            record.len()
        ));
    }
    let (path, label) = (record[0].trim(), record[1].trim());
    if path.is_empty() || label.is_empty() {
        return Err("empty path or label".into());
    }
    let split = record.get(2).map(|s| s.trim().to_string());
    if let Some(s) = &split {
        const KNOWN: [&str; 6] = ["train", "test", "pretrain", "probe", "distill", "eval"];
        if !KNOWN.contains(&s.as_str()) {
            return Err(format!("split `{s}` is none of {KNOWN:?}"));
        }
    }
    Ok((clips.join(path), path.to_string(), label.to_string(), split))
}

/// The split a `train` row goes to: a hash of its clip name and the seed against the shares,
/// so the same list and seed always split the same way.
fn train_split(name: &str, seed: u64, shares: TrainShares) -> &'static str {
    // FNV-1a over the name, then a splitmix finaliser with the seed: stable across builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    let total = shares.pretrain + shares.probe + shares.distill;
    if u * total < shares.pretrain {
        "pretrain"
    } else if u * total < shares.pretrain + shares.probe {
        "probe"
    } else {
        "distill"
    }
}

fn class_list(opts: &Options, rows: &[Row]) -> Result<Vec<String>> {
    let Some(path) = &opts.classes else {
        let names: std::collections::BTreeSet<&str> =
            rows.iter().map(|r| r.label.as_str()).collect();
        return Ok(names.into_iter().map(str::to_string).collect());
    };
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut classes = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() {
            continue;
        }
        if !seen.insert(name) {
            bail!(
                "{}:{}: class `{name}` is listed twice",
                path.display(),
                i + 1
            );
        }
        classes.push(name.to_string());
    }
    if classes.is_empty() {
        bail!("{} lists no class", path.display());
    }
    Ok(classes)
}

// ---------------------------------------------------------------------------------------------
// one clip

/// A finished clip.
#[derive(Debug, Clone)]
struct Done {
    audio: String,
    frames: Vec<String>,
    kept: bool,
    source_bytes: u64,
    prepared_bytes: u64,
}

/// A finished clip's record of what it was made from and how: `clip.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClipFile {
    source: String,
    source_bytes: u64,
    settings: Settings,
    audio: String,
    frames: Vec<String>,
}

fn clip_dir(id: u64) -> String {
    format!("clips/{}/{id}", id / 1000)
}

fn prepare_clip(opts: &Options, row: &Row) -> Result<Done, BadClip> {
    let bad = |reason: Reason, detail: String| BadClip {
        line: row.line,
        clip: row.name.clone(),
        reason,
        detail,
    };
    let source_bytes = match fs::metadata(&row.path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return Err(bad(Reason::Missing, "not a file".into())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(bad(Reason::Missing, "no such file".into()))
        }
        Err(e) => return Err(bad(Reason::Missing, format!("cannot read: {e}"))),
    };
    if source_bytes == 0 {
        return Err(bad(Reason::Empty, "0 bytes".into()));
    }
    let rel = clip_dir(row.line);
    let dir = opts.out.join(&rel);
    if let Some(done) = finished(&dir, row, source_bytes, &opts.settings) {
        return Ok(Done {
            audio: format!("{rel}/{}", done.audio),
            frames: done.frames.iter().map(|f| format!("{rel}/{f}")).collect(),
            kept: true,
            source_bytes,
            prepared_bytes: 0,
        });
    }
    let partial = dir.with_extension("partial");
    let io = |what: &str, e: std::io::Error| {
        bad(
            Reason::Undecodable,
            format!("cannot {what} under {}: {e}", opts.out.display()),
        )
    };
    for stale in [&dir, &partial] {
        if stale.exists() {
            fs::remove_dir_all(stale).map_err(|e| io("remove a stale clip", e))?;
        }
    }
    fs::create_dir_all(&partial).map_err(|e| io("create a clip directory", e))?;
    let made = decode(&row.path, &partial, &opts.settings).map_err(|(r, d)| bad(r, d));
    let made = match made {
        Ok(made) => made,
        Err(b) => {
            let _ = fs::remove_dir_all(&partial);
            return Err(b);
        }
    };
    let record = ClipFile {
        source: row.name.clone(),
        source_bytes,
        settings: opts.settings.clone(),
        audio: "audio.wav".into(),
        frames: made.frames,
    };
    let json = serde_json::to_vec(&record).expect("a clip record serialises");
    fs::write(partial.join("clip.json"), json).map_err(|e| io("write clip.json", e))?;
    fs::rename(&partial, &dir).map_err(|e| io("finish a clip", e))?;
    Ok(Done {
        audio: format!("{rel}/{}", record.audio),
        frames: record.frames.iter().map(|f| format!("{rel}/{f}")).collect(),
        kept: false,
        source_bytes,
        prepared_bytes: made.bytes,
    })
}

/// The clip a previous run finished from the same source with the same settings.
fn finished(dir: &Path, row: &Row, source_bytes: u64, settings: &Settings) -> Option<ClipFile> {
    let record: ClipFile = serde_json::from_slice(&fs::read(dir.join("clip.json")).ok()?).ok()?;
    (record.source == row.name
        && record.source_bytes == source_bytes
        && record.settings == *settings
        && dir.join(&record.audio).is_file()
        && record.frames.iter().all(|f| dir.join(f).is_file()))
    .then_some(record)
}

struct Made {
    frames: Vec<String>,
    bytes: u64,
}

/// What `ffprobe` says of a file.
#[derive(Debug, Deserialize)]
struct Probe {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    format: Option<ProbeFormat>,
}

#[derive(Debug, Deserialize)]
struct ProbeStream {
    codec_type: String,
    width: Option<usize>,
    height: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ProbeFormat {
    duration: Option<String>,
}

type Failure = (Reason, String);

fn decode(src: &Path, out: &Path, settings: &Settings) -> Result<Made, Failure> {
    let probe = probe(src)?;
    let video = probe.streams.iter().find(|s| s.codec_type == "video");
    if !probe.streams.iter().any(|s| s.codec_type == "audio") {
        return Err((Reason::NoAudio, "no audio stream".into()));
    }
    let Some(video) = video else {
        return Err((Reason::NoVideo, "no video stream".into()));
    };
    let duration = probe
        .format
        .and_then(|f| f.duration)
        .and_then(|d| d.parse::<f64>().ok());
    let want = settings.seconds;
    if let Some(d) = duration {
        if d + 1e-3 < want * (1.0 - AUDIO_SLACK) {
            return Err((Reason::Short, format!("{d:.2} s, {want} s asked")));
        }
    }
    // Tiny stand-in frames keep full chroma at the finest quantiser; Qwen2-VL's large ones
    // take JPEG's usual 4:2:0 at a quantiser that keeps them near the source's size.
    let (count, width, height, fps, chroma, quality) = match settings.frames {
        Frames::Standin { count, size } => {
            (count, size, size, count as f64 / want, "yuvj444p", "2")
        }
        Frames::Qwen2Vl { fps, max_pixels } => {
            let (Some(w), Some(h)) = (video.width, video.height) else {
                return Err((Reason::Undecodable, "the video stream has no size".into()));
            };
            let count = (((want * fps).floor() as usize) / 2 * 2).max(2);
            let (rh, rw) = qwen2_vl_size(h, w, max_pixels)
                .ok_or_else(|| (Reason::Undecodable, format!("{w}x{h} cannot be resized")))?;
            (count, rw, rh, fps, "yuvj420p", "4")
        }
    };
    let wav = out.join("audio.raw.wav");
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
        .arg(src)
        .args(["-t", &format!("{want}")])
        .args([
            "-map",
            "0:a:0",
            "-ac",
            "1",
            "-ar",
            &settings.sample_rate.to_string(),
        ])
        .args(["-af", "aresample=resampler=soxr", "-c:a", "pcm_s16le"])
        .arg(&wav)
        .args(["-map", "0:v:0", "-vf"])
        .arg(format!(
            "fps={fps},scale={width}:{height}:flags=bicubic,format={chroma}"
        ))
        .args(["-frames:v", &count.to_string(), "-q:v", quality])
        .arg(out.join("%02d.jpg"))
        .output()
        .map_err(|e| (Reason::Undecodable, format!("cannot run ffmpeg: {e}")))?;
    let stderr = last_line(&output.stderr);
    let frames: Vec<String> = (1..=count).map(|k| format!("{k:02}.jpg")).collect();
    let have = frames.iter().take_while(|f| out.join(f).is_file()).count();
    let samples = hound::WavReader::open(&wav)
        .ok()
        .map(|r| r.duration() as usize);
    let asked = (want * settings.sample_rate as f64).round() as usize;
    let decoded_enough =
        matches!(samples, Some(n) if n as f64 >= asked as f64 * (1.0 - AUDIO_SLACK));
    if !output.status.success() || have < count || !decoded_enough {
        let got = samples.map_or(0.0, |n| n as f64 / settings.sample_rate as f64);
        let detail = format!(
            "decoded {got:.2} s of audio and {have} of {count} frames{}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {stderr}")
            }
        );
        // Less than the container declares is a cut file; a file that says it is short is
        // short; a file that decodes nothing is undecodable.
        let reason = match duration {
            _ if have == 0 && samples.is_none() => Reason::Undecodable,
            Some(d) if d + 1e-3 < want => Reason::Short,
            _ => Reason::Truncated,
        };
        return Err((reason, detail));
    }
    // Exactly the asked length: the codecs' few missing milliseconds are zero-padded.
    let mut audio = crate::clip::load_audio(&wav, settings.sample_rate)
        .map_err(|e| (Reason::Undecodable, format!("{e:#}")))?;
    audio.resize(asked, 0.0);
    write_wav(&out.join("audio.wav"), settings.sample_rate, &audio)
        .map_err(|e| (Reason::Undecodable, format!("{e:#}")))?;
    let _ = fs::remove_file(&wav);
    let mut bytes = fs::metadata(out.join("audio.wav")).map_or(0, |m| m.len());
    for f in &frames {
        bytes += fs::metadata(out.join(f)).map_or(0, |m| m.len());
    }
    Ok(Made { frames, bytes })
}

fn probe(src: &Path) -> Result<Probe, Failure> {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-of", "json"])
        .args([
            "-show_entries",
            "stream=codec_type,width,height:format=duration",
        ])
        .arg(src)
        .output()
        .map_err(|e| (Reason::Undecodable, format!("cannot run ffprobe: {e}")))?;
    let stderr = last_line(&output.stderr);
    if !output.status.success() {
        // An mp4 cut before its index ("moov atom not found") is a truncated download.
        let reason = if String::from_utf8_lossy(&output.stderr).contains("moov atom not found") {
            Reason::Truncated
        } else {
            Reason::Undecodable
        };
        return Err((reason, stderr));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| (Reason::Undecodable, format!("ffprobe's answer: {e}")))
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Height and width for Qwen2-VL: multiples of 28 nearest the source, scaled down (aspect
/// kept) to at most `max_pixels`. `None` when the picture is smaller than 28 either way.
pub fn qwen2_vl_size(h: usize, w: usize, max_pixels: usize) -> Option<(usize, usize)> {
    let f = QWEN2_VL_FACTOR as f64;
    let (hf, wf) = (h as f64, w as f64);
    if h < QWEN2_VL_FACTOR || w < QWEN2_VL_FACTOR || max_pixels < QWEN2_VL_FACTOR.pow(2) {
        return None;
    }
    let (mut hb, mut wb) = ((hf / f).round() * f, (wf / f).round() * f);
    if hb * wb > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = ((hf / beta / f).floor() * f).max(f);
        wb = ((wf / beta / f).floor() * f).max(f);
    }
    Some((hb as usize, wb as usize))
}

// ---------------------------------------------------------------------------------------------
// outputs

fn write_outputs(
    out: &Path,
    classes: &[String],
    manifest: &[ClipRecord],
    bad: &[BadClip],
    summary: &Summary,
) -> Result<()> {
    let mut lines = Vec::new();
    for clip in manifest {
        serde_json::to_writer(&mut lines, clip)?;
        lines.push(b'\n');
    }
    write_whole(&out.join(MANIFEST_FILE), &lines)?;
    let classes = ClassesFile {
        classes: classes.to_vec(),
        construction: Vec::new(),
    };
    write_whole(
        &out.join(CLASSES_FILE),
        &serde_json::to_vec_pretty(&classes)?,
    )?;
    let mut lines = Vec::new();
    for b in bad {
        serde_json::to_writer(&mut lines, b)?;
        lines.push(b'\n');
    }
    write_whole(&out.join(BAD_CLIPS_FILE), &lines)?;
    write_whole(
        &out.join(SUMMARY_FILE),
        &serde_json::to_vec_pretty(summary)?,
    )
}

/// Writes a file under a temporary name and renames it: a reader sees the old file or the new
/// one, never half of one.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// A periodic line for logs: at most one per `every`, and the last.
pub struct Every {
    every: Duration,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Every {
    pub fn new(every: Duration) -> Self {
        Every {
            every,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether to print now.
    pub fn due(&self, done: usize, total: usize) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if done == total || last.is_none_or(|t| now.duration_since(t) >= self.every) {
            *last = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_vl_sizes_are_multiples_of_28_under_the_cap() {
        // 360p: 640x360 rounds to 644x364 (234,416 pixels, under 602,112).
        assert_eq!(
            qwen2_vl_size(360, 640, QWEN2_VL_MAX_PIXELS),
            Some((364, 644))
        );
        // 1080p is scaled down, aspect kept, under the cap.
        let (h, w) = qwen2_vl_size(1080, 1920, QWEN2_VL_MAX_PIXELS).unwrap();
        assert_eq!((h % 28, w % 28), (0, 0));
        assert!(h * w <= QWEN2_VL_MAX_PIXELS, "{h}x{w}");
        assert!((w as f64 / h as f64 - 16.0 / 9.0).abs() < 0.1, "{h}x{w}");
        assert_eq!(qwen2_vl_size(20, 640, QWEN2_VL_MAX_PIXELS), None);
    }

    #[test]
    fn train_rows_split_by_share_and_stably() {
        let shares = TrainShares::default();
        let names: Vec<String> = (0..4000).map(|i| format!("clip{i}_000030.mp4")).collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for n in &names {
            let s = train_split(n, 7, shares);
            assert_eq!(
                s,
                train_split(n, 7, shares),
                "the same name splits the same way"
            );
            *counts.entry(s).or_default() += 1;
        }
        for (split, share) in [("pretrain", 0.5), ("probe", 0.2), ("distill", 0.3)] {
            let got = counts[split] as f64 / names.len() as f64;
            assert!((got - share).abs() < 0.03, "{split}: {got} for {share}");
        }
        let moved = names
            .iter()
            .filter(|n| train_split(n, 7, shares) != train_split(n, 8, shares))
            .count();
        assert!(
            moved > 1000,
            "another seed splits differently ({moved} moved)"
        );
    }

    #[test]
    fn vggsound_rows_name_their_clip_and_refuse_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("abc_000012.webm"), b"x").unwrap();
        let row = |fields: &[&str]| csv::StringRecord::from(fields.to_vec());
        let (path, name, label, split) =
            vggsound_row(&row(&["abc", "12", "dog barking", "test"]), dir.path()).unwrap();
        assert_eq!(name, "abc_000012.webm", "the extension found on disk");
        assert_eq!(path, dir.path().join("abc_000012.webm"));
        assert_eq!(
            (label.as_str(), split.as_deref()),
            ("dog barking", Some("test"))
        );
        let (_, name, ..) = vggsound_row(&row(&["zz", "7", "x", "train"]), dir.path()).unwrap();
        assert_eq!(name, "zz_000007.mp4", "a missing clip is named as mp4");
        for (fields, says) in [
            (&["abc", "x", "dog", "train"][..], "start_seconds"),
            (&["abc", "1", "dog", "valid"][..], "split `valid`"),
            (&["abc", "1", "dog"][..], "3 fields"),
        ] {
            let err = vggsound_row(&row(fields), dir.path()).unwrap_err();
            assert!(err.contains(says), "{fields:?}: {err}");
        }
    }
}
