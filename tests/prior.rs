//! The heuristic's human prior from the real VGGSounder labels (issue 13, item 2): `xkd data
//! prior` reads PyPI vggsounder 1.0's `vggsounder.csv` (installed by tests/data/vggsounder.sh)
//! and writes `heuristic.prior_csv` for each student. The values checked were counted in the
//! same file with Python's csv module: "ambulance siren" has 23 rows heard only and 20 heard
//! and seen; "people running" 4 heard only, 36 seen only, 51 both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn priors(path: &Path) -> HashMap<String, f64> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    assert_eq!(reader.headers().unwrap(), vec!["class", "prior"]);
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_string(), r[1].parse().unwrap())
        })
        .collect()
}

#[test]
fn vggsounder_labels_become_the_heuristic_prior_for_either_student() {
    let labels = Command::new("tests/data/vggsounder.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("tests/data/vggsounder.sh runs");
    assert!(labels.status.success(), "{labels:?}");
    let labels = String::from_utf8(labels.stdout).unwrap().trim().to_string();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("prior");
    std::fs::create_dir_all(&dir).unwrap();
    let make = |student: &str| {
        let out = dir.join(format!("{student}.csv"));
        let run = Command::new(env!("CARGO_BIN_EXE_xkd"))
            .args([
                "data",
                "prior",
                "--vggsounder",
                &labels,
                "--student",
                student,
            ])
            .arg("--out")
            .arg(&out)
            .output()
            .expect("xkd starts");
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{run:?}");
        assert!(stdout.contains("309 classes"), "{stdout}");
        priors(&out)
    };
    let (audio, visual) = (make("audio"), make("visual"));
    assert_eq!(audio.len(), 309);
    assert_eq!(visual.len(), 309);
    assert!(audio
        .values()
        .chain(visual.values())
        .all(|p| (0.0..=1.0).contains(p)));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(close(audio["ambulance siren"], 1.0));
    assert!(close(visual["ambulance siren"], 20.0 / 43.0));
    assert!(close(audio["people running"], 55.0 / 91.0));
    assert!(close(visual["people running"], 87.0 / 91.0));
    // A class name with a comma survives the round trip.
    assert!(audio.contains_key("bird chirping, tweeting"));

    // A file that is not VGGSounder's is refused, naming what it lacks; exit 1, not a panic.
    let wrong = dir.join("wrong.csv");
    std::fs::write(&wrong, "class,prior\nsailing,0.5\n").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_xkd"))
        .args(["data", "prior", "--student", "audio", "--out"])
        .arg(dir.join("never.csv"))
        .arg("--vggsounder")
        .arg(&wrong)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no `label` column"), "{stderr}");
}
