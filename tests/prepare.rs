//! Real files end to end (issue 13): the synthetic set made into real clips by FFmpeg (mp4 with
//! H.264 and AAC, webm with VP9 and Opus), beside one clip of every bad kind and bad CSV lines;
//! `xkd data prepare` prepares every good clip and lists every bad one with its reason, a second
//! run prepares nothing, a half-written clip is redone, and `xkd run` trains on the result,
//! prepared into a real S3-compatible server (s3s-fs) and downloaded once by the node's workers.
//! FFmpeg comes from Debian (tests/data/ffmpeg.sh installs it when missing).

mod common;

use common::{fresh_dir, report, run_args, small_recipe, xkd};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use xkd_config::Config;

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success(), "ffmpeg {args:?}: {out:?}");
}

/// One CSV row, quoted where a field needs it (class names hold commas).
fn row(fields: &[&str]) -> String {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    w.write_record(fields).unwrap();
    String::from_utf8(w.into_inner().unwrap())
        .unwrap()
        .trim_end()
        .to_string()
}

fn install_ffmpeg() {
    let out = Command::new("tests/data/ffmpeg.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("tests/data/ffmpeg.sh runs");
    assert!(out.status.success(), "{out:?}");
}

/// Every synthetic clip as a real file: even ids mp4 (H.264, AAC), odd ids webm (VP9, Opus).
/// Returns the CSV rows `file,class,split`.
fn encode_synthetic(set: &Path, clips: &Path, fps: f64) -> Vec<String> {
    let manifest = xkd_data::load_manifest(set).unwrap();
    let records = manifest.clips.clone();
    let rows: Vec<String> = records
        .iter()
        .map(|c| {
            let ext = if c.id % 2 == 0 { "mp4" } else { "webm" };
            row(&[&format!("clip{}.{ext}", c.id), &c.class, &c.split])
        })
        .collect();
    std::thread::scope(|scope| {
        for part in records.chunks(records.len().div_ceil(2)) {
            let manifest = &manifest;
            scope.spawn(move || {
                for c in part {
                    let frames = set.join(format!("frames/{}_%d.png", c.id));
                    let audio = manifest.audio_path(c);
                    let (ext, codecs): (&str, &[&str]) = if c.id % 2 == 0 {
                        (
                            "mp4",
                            &["-c:v", "libx264", "-crf", "4", "-c:a", "aac", "-b:a", "96k"],
                        )
                    } else {
                        (
                            "webm",
                            &[
                                "-c:v",
                                "libvpx-vp9",
                                "-crf",
                                "4",
                                "-b:v",
                                "0",
                                "-c:a",
                                "libopus",
                            ],
                        )
                    };
                    let out = clips.join(format!("clip{}.{ext}", c.id));
                    let mut args = vec![
                        "-framerate".to_string(),
                        fps.to_string(),
                        "-start_number".into(),
                        "0".into(),
                        "-i".into(),
                        frames.display().to_string(),
                        "-i".into(),
                        audio.display().to_string(),
                        "-pix_fmt".into(),
                        "yuv444p".into(),
                    ];
                    args.extend(codecs.iter().map(|s| s.to_string()));
                    args.push(out.display().to_string());
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    ffmpeg(&args);
                }
            });
        }
    });
    rows
}

/// One clip of every bad kind, named by what it is; returns (CSV row, expected reason).
fn bad_clips(clips: &Path, class: &str, good: &Path) -> Vec<(String, &'static str)> {
    let tone = "sine=frequency=440:sample_rate=16000:duration=0.5";
    let picture = "testsrc2=size=32x32:rate=8:duration=0.5";
    let p = |name: &str| clips.join(name).display().to_string();
    // Audio but no picture; a picture but no audio; half as long as asked.
    ffmpeg(&["-f", "lavfi", "-i", tone, "-c:a", "aac", &p("no_video.mp4")]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        picture,
        "-c:v",
        "libx264",
        &p("no_audio.mp4"),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=32x32:rate=8:duration=0.25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=16000:duration=0.25",
        "-c:v",
        "libx264",
        "-c:a",
        "aac",
        &p("short.mp4"),
    ]);
    // A download cut in half: an mp4's index comes last, so none of it is left.
    let whole = fs::read(good).unwrap();
    fs::write(clips.join("truncated.mp4"), &whole[..whole.len() / 2]).unwrap();
    fs::write(clips.join("empty.mp4"), b"").unwrap();
    fs::write(clips.join("garbage.webm"), vec![0x5a; 4096]).unwrap();
    fs::copy(good, clips.join("other_class.mp4")).unwrap();
    let r = |file: &str, class: &str, split: &str| row(&[file, class, split]);
    vec![
        (r("no_video.mp4", class, "eval"), "no_video"),
        (r("no_audio.mp4", class, "eval"), "no_audio"),
        (r("short.mp4", class, "eval"), "short"),
        (r("truncated.mp4", class, "eval"), "truncated"),
        (r("empty.mp4", class, "eval"), "empty"),
        (r("garbage.webm", class, "eval"), "undecodable"),
        (r("never_downloaded.mp4", class, "eval"), "missing"),
        (r("other_class.mp4", "not a class", "eval"), "unknown_label"),
        (r("clip1.webm", class, "eval"), "duplicate"),
        (r("clip2.mp4", class, "evaluation"), "malformed"),
        ("a,b,c,d,e".to_string(), "malformed"),
    ]
}

fn prepare(csv: &Path, clips: &Path, out: &Path, classes: &Path, sets: &[String]) -> String {
    let mut args: Vec<String> = ["data", "prepare", "--format", "paths", "--csv"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, path) in [
        (None, csv),
        (Some("--clips"), clips),
        (Some("--out"), out),
        (Some("--classes"), classes),
    ] {
        if let Some(flag) = flag {
            args.push(flag.into());
        }
        args.push(path.display().to_string());
    }
    for set in sets {
        args.extend(["--set".to_string(), set.clone()]);
    }
    let (code, stdout, stderr) = xkd(&args, &[]);
    assert_eq!(code, 0, "xkd data prepare failed:\n{stdout}\n{stderr}");
    stdout
}

fn jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn real_clips_are_prepared_resumed_and_trained_on() {
    install_ffmpeg();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let base = fresh_dir(&root, "prepare");
    let sets = small_recipe(&base.join("cache"), "prepared", 10, 5, 1);
    let config = Config::resolve(None, &sets).unwrap();
    // The synthetic set, generated as a run would, then made into real clips.
    let set = base.join("synthetic");
    xkd_data::ensure_dataset(&config.data, &set).unwrap();
    let clips = base.join("clips");
    fs::create_dir_all(&clips).unwrap();
    let fps = config.data.frames as f64 / config.data.clip_seconds as f64;
    let good = encode_synthetic(&set, &clips, fps);
    let classes = xkd_data::load_manifest(&set).unwrap().classes;
    let bad = bad_clips(&clips, &classes[0], &clips.join("clip0.mp4"));
    let mut csv = good.join("\n") + "\n";
    for (row, _) in &bad {
        csv += &format!("{row}\n");
    }
    fs::write(base.join("clips.csv"), &csv).unwrap();
    fs::write(base.join("classes.txt"), classes.join("\n") + "\n").unwrap();
    let (list, class_file, out) = (
        base.join("clips.csv"),
        base.join("classes.txt"),
        base.join("prepared"),
    );

    let first = prepare(&list, &clips, &out, &class_file, &sets);
    assert!(
        first.contains(&format!("{} clips prepared now, 0 kept", good.len())),
        "{first}"
    );

    // Every good clip in the manifest, with its class and split and readable files.
    let manifest = xkd_data::load_manifest(&out).unwrap();
    assert_eq!(manifest.classes, classes);
    assert_eq!(manifest.clips.len(), good.len());
    let source = xkd_data::load_manifest(&set).unwrap();
    for ((clip, from), row) in manifest.clips.iter().zip(&source.clips).zip(&good) {
        assert_eq!(
            (&clip.class, &clip.split),
            (&from.class, &from.split),
            "{row}"
        );
        let audio =
            xkd_data::load_audio(&manifest.audio_path(clip), config.data.sample_rate).unwrap();
        assert_eq!(
            audio.len(),
            config.clip_samples(),
            "{row}: the asked length exactly"
        );
        let frames = xkd_data::load_frames(&manifest.frame_paths(clip)).unwrap();
        let s = config.data.frame_size;
        assert_eq!(frames.len(), config.data.frames * 3 * s * s, "{row}");
    }
    // Every bad row listed once, by its line, with the reason of its kind.
    let listed = jsonl(&out.join("bad_clips.jsonl"));
    let got: BTreeSet<(u64, String)> = listed
        .iter()
        .map(|b| {
            (
                b["line"].as_u64().unwrap(),
                b["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(u64, String)> = bad
        .iter()
        .enumerate()
        .map(|(i, (_, reason))| ((good.len() + i + 1) as u64, reason.to_string()))
        .collect();
    assert_eq!(got, want, "bad_clips.jsonl:\n{listed:#?}");
    assert!(first.contains(&format!("{} bad", bad.len())), "{first}");

    // A second run prepares nothing.
    let second = prepare(&list, &clips, &out, &class_file, &sets);
    assert!(
        second.contains(&format!("0 clips prepared now, {} kept", good.len())),
        "{second}"
    );

    // A clip left half-written (its work directory, no finished one) is redone, and only it.
    let victim = &manifest.clips[3];
    let dir = out.join(Path::new(&victim.audio).parent().unwrap());
    fs::remove_dir_all(&dir).unwrap();
    fs::create_dir_all(dir.with_extension("partial")).unwrap();
    fs::write(dir.with_extension("partial").join("01.jpg"), b"half").unwrap();
    let third = prepare(&list, &clips, &out, &class_file, &sets);
    assert!(
        third.contains(&format!("1 clips prepared now, {} kept", good.len() - 1)),
        "{third}"
    );
    assert!(!dir.with_extension("partial").exists());

    // Training on the prepared set, end to end, from an object store as a cluster without a
    // shared filesystem would: the two workers of this node download it once.
    // Prepared straight into the store; a second run decodes nothing and uploads only the
    // four index files.
    let server = common::s3::S3Server::start();
    let url = server.url("sets/prepared");
    let remote = |env: &[(String, String)]| {
        let mut args: Vec<String> = ["data", "prepare", "--format", "paths"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (flag, value) in [
            ("--csv", list.display().to_string()),
            ("--clips", clips.display().to_string()),
            ("--out", url.clone()),
            ("--classes", class_file.display().to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        for set in &sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        let (code, stdout, stderr) = xkd(&args, env);
        assert_eq!(
            code, 0,
            "xkd data prepare --out {url} failed:\n{stdout}\n{stderr}"
        );
        stdout
    };
    let uploaded = remote(&server.env());
    assert!(
        uploaded.contains(&format!("{} clips prepared now", good.len())),
        "{uploaded}"
    );
    let again = remote(&server.env());
    assert!(again.contains("0 clips prepared now"), "{again}");
    let files = good.len() * (2 + config.data.frames); // clip.json, audio.wav, the frames
    assert!(
        again.contains(&format!(
            "uploaded 4 files to {url} ({files} were there already)"
        )),
        "{again}"
    );
    let run_out = base.join("run");
    let mut run_sets = sets.clone();
    run_sets.push("data.source=\"manifest\"".into());
    run_sets.push(format!("data.dir=\"{url}\""));
    let (code, stdout, stderr) = xkd(&run_args(&run_out, &run_sets, &[]), &server.env());
    assert_eq!(
        code, 0,
        "xkd run on the prepared set failed:\n{stdout}\n{stderr}"
    );
    let logs: String = fs::read_dir(run_out.join("logs"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let downloads = logs.matches("downloading into the node's cache").count();
    assert_eq!(downloads, 1, "one download for the node:\n{logs}");
    assert!(logs.contains("dataset found in the node's cache"), "{logs}");
    let report = report(&run_out);
    let last = report["final_checkpoint"].as_str().unwrap_or_default();
    assert!(last.ends_with("/ckpt/0000000010"), "{report:#}");
    assert!(run_out.join("report.md").is_file());
}
