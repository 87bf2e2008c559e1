//! The Kubernetes launch files, checked without a cluster: tests/k8s/check.sh validates
//! deploy/k8s/xkd.yaml against the Kubernetes API schemas (kubernetes-validate --strict) and
//! checks the coordinator's recipe and arguments resolve through this `xkd` and agree with the
//! worker Job, that the coordinator's metrics port is exposed and annotated for scraping,
//! and that its NetworkPolicy admits traffic to the run's pods only from each other (and
//! to the metrics port from anywhere). (The Slurm script runs on a real Slurm: tests/slurm.rs.)

use std::process::Command;

#[test]
fn the_kubernetes_manifest_is_valid_and_agrees_with_its_recipe() {
    let out = Command::new("tests/k8s/check.sh")
        .env("XKD", env!("CARGO_BIN_EXE_xkd"))
        .output()
        .expect("tests/k8s/check.sh runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("valid; 8 workers"), "{stdout}");
    // The coordinator's metrics port, with the scrape annotations on its pod (check.sh
    // checks they name the --metrics-listen port, a containerPort and a Service port).
    assert!(
        stdout.contains("metrics scraped at :9733/metrics"),
        "{stdout}"
    );
    // NCCL's connections are not authenticated: the run's pods admit only each other.
    assert!(
        stdout.contains("ingress only from the run's pods"),
        "{stdout}"
    );
}

/// Issue 17, item 5: deploy/Containerfile passes hadolint, and the check is one that fails on
/// a file with the mistakes it exists for (an untagged base, an unpinned, prompting install).
#[test]
fn the_containerfile_passes_hadolint() {
    let lint = |file: Option<&std::path::Path>| {
        let mut cmd = Command::new("tests/container/hadolint.sh");
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(file) = file {
            cmd.arg(file);
        }
        let out = cmd.output().expect("tests/container/hadolint.sh runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = lint(None);
    assert!(ok, "deploy/Containerfile:\n{text}");
    let bad = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad.Containerfile");
    std::fs::write(&bad, "FROM debian\nRUN apt-get install curl\n").unwrap();
    let (ok, text) = lint(Some(&bad));
    assert!(!ok && text.contains("DL3006"), "a bad file passed:\n{text}");
}
