use super::audio::*;
use super::visual::*;
use super::*;
use crate::clip::*;
use crate::features::LogMel;
use crate::manifest::*;
use std::collections::{HashMap, HashSet};

fn small_cfg(seed: u64) -> DataConfig {
    DataConfig {
        source: DataSource::Synthetic,
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
        let wav = load_audio(&m.audio_path(clip), 16000).expect("wav");
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
    manifest_cfg.source = DataSource::Manifest;
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
    let err = format!("{:#}", load_audio(&path, 16000).expect_err("stereo"));
    assert!(
        err.contains("stereo.wav") && err.contains("2 channels"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        load_audio(&tmp.path().join("gone.wav"), 16000).expect_err("missing")
    );
    assert!(err.contains("gone.wav"), "{err}");
    let bad = tmp.path().join("bad.png");
    fs::write(&bad, b"not a png").expect("write");
    let err = format!("{:#}", load_frames(&[bad]).expect_err("bad png"));
    assert!(err.contains("bad.png"), "{err}");
}

#[test]
fn load_audio_refuses_another_sample_rate_and_names_both() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("fast.wav");
    write_wav(&path, 48000, &[0.25; 480]).expect("write");
    let err = format!(
        "{:#}",
        load_audio(&path, 16000).expect_err("48 kHz as 16 kHz")
    );
    assert!(
        err.contains("fast.wav")
            && err.contains("48000 Hz")
            && err.contains("prepare the data at 16000 Hz"),
        "{err}"
    );
    let wav = load_audio(&path, 48000).expect("at its own rate");
    assert_eq!(wav.len(), 480);
    assert!((wav[0] - 0.25).abs() < 1e-4, "{}", wav[0]);
}

#[test]
fn a_sparse_unordered_manifest_loads_and_finds_every_clip_by_id() {
    let (_tmp, m) = generate(&small_cfg(4));
    // Ids 7, 1007, 2007, ... written in reverse order: neither dense nor sorted.
    let sparse = |id: u32| id * 1000 + 7;
    let rows: Vec<String> = m
        .clips
        .iter()
        .rev()
        .map(|c| {
            let clip = ClipRecord {
                id: sparse(c.id),
                ..c.clone()
            };
            serde_json::to_string(&clip).expect("row")
        })
        .collect();
    fs::write(m.dir.join(MANIFEST_FILE), rows.join("\n")).expect("write");
    let loaded = load_manifest(&m.dir).expect("a sparse manifest loads");
    assert_eq!(loaded.clips.len(), m.clips.len());
    for clip in &m.clips {
        let found = loaded.clip(sparse(clip.id)).expect("every id is found");
        assert_eq!((found.id, &found.audio), (sparse(clip.id), &clip.audio));
        let wav = load_audio(&loaded.audio_path(found), 16000).expect("its audio");
        assert_eq!(wav, load_audio(&m.audio_path(clip), 16000).expect("wav"));
    }
    for absent in [0, 1, 8, 1006, u32::MAX] {
        assert!(
            loaded.clip(absent).is_none(),
            "id {absent} is not in the manifest"
        );
    }
    assert_eq!(m.clip(3).map(|c| c.id), Some(3), "dense ids are found too");
}

/// Mean log-mel over time of every clip, `[40]` each.
fn mel_profiles(m: &Manifest) -> Vec<Vec<f32>> {
    let lm = LogMel::new(16000, 400, 160, 40);
    m.clips
        .iter()
        .map(|clip| {
            let wav = load_audio(&m.audio_path(clip), 16000).expect("wav");
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
    let centred = |x: &[f32]| -> Vec<f32> { x.iter().zip(&global).map(|(a, g)| a - g).collect() };
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
    let cfg = xkd_config::Config::embedded().data;
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
