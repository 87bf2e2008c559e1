//! A dataset on disk: `manifest.jsonl` (one `ClipRecord` per clip) and `classes.json` (class
//! names in label order), as the synthetic generator writes them and as a prepared real set
//! will. Loading checks every row and names the file and line of the first bad one. Clip ids
//! are names, not positions: they need only be unique, and `Manifest::clip` finds a clip by
//! its id through an index built at load.

use crate::synth::Cue;
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use xkd_config::Modality;

pub const MANIFEST_FILE: &str = "manifest.jsonl";
pub const CLASSES_FILE: &str = "classes.json";
/// Split names in clip-id order.
pub const SPLITS: [&str; 4] = ["pretrain", "probe", "distill", "eval"];

/// A loaded dataset: class names in label order and one record per clip, in file order.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub classes: Vec<String>,
    pub clips: Vec<ClipRecord>,
    /// Clip id -> index in `clips`, built by `load_manifest`: ids may be sparse and in any
    /// order, so an id is never used as an index.
    rows: HashMap<u32, usize>,
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

    /// The clip with id `id`, in O(1).
    pub fn clip(&self, id: u32) -> Option<&ClipRecord> {
        self.rows
            .get(&id)
            .and_then(|&row| self.clips.get(row))
            .filter(|clip| clip.id == id)
    }

    /// Clips of one split, in manifest order.
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ClipRecord> + 'a {
        self.clips.iter().filter(move |c| c.split == name)
    }
}

/// On-disk form of `classes.json`.
#[derive(Serialize, Deserialize)]
pub(crate) struct ClassesFile {
    pub(crate) classes: Vec<String>,
    /// How each class was built (the synthetic set; empty for a prepared one); only tests
    /// read it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) construction: Vec<ConstructionRow>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ConstructionRow {
    pub(crate) name: String,
    pub(crate) audio: Cue,
    pub(crate) visual: Cue,
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
    let rows = check_rows(&clips, &classes, &manifest_path)?;
    Ok(Manifest {
        dir: dir.to_path_buf(),
        classes,
        clips,
        rows,
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
    // Every rank keeps the manifest for its lifetime; the doubling's spare rows (up to half of
    // what 200,000 clips take) would stay with it.
    clips.shrink_to_fit();
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

/// Labels in range, names matching labels, ids unique, splits known. Returns the id -> row index.
fn check_rows(
    clips: &[ClipRecord],
    classes: &[String],
    manifest_path: &Path,
) -> anyhow::Result<HashMap<u32, usize>> {
    let mut rows = HashMap::with_capacity(clips.len());
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
        if let Some(first) = rows.insert(clip.id, row) {
            bail!("{at}: duplicate clip id (also on row {})", first + 1);
        }
        if !SPLITS.contains(&clip.split.as_str()) {
            bail!(
                "{at}: unknown split `{}` (expected one of {SPLITS:?})",
                clip.split
            );
        }
    }
    Ok(rows)
}
