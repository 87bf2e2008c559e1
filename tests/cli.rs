//! The command-line contract, as a user meets it: exit codes, messages, printed config.

mod common;

use serde_json::Value;
use std::process::Command;

fn xkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xkd"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = xkd().args(args).output().expect("xkd starts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_exits_2_and_names_it() {
    let (code, _, err) = run(&["run", "--set", "no.such.key=1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no.such.key"), "{err}");
}

#[test]
fn bad_value_exits_2_and_names_the_key() {
    let (code, _, err) = run(&["config", "show", "--set", "distill.alpha=lots"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("distill.alpha"), "{err}");
    let (code, _, err) = run(&["run", "--workers", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("batch"), "{err}");
}

/// Issue 14's three: each once a panic, or workers restarted three times. Now refused with
/// exit 2 naming the key, before the run makes its output directory or starts a worker.
#[test]
fn values_the_run_cannot_use_exit_2_before_any_worker_starts() {
    for (set, key) in [
        ("audio_model.encoder_heads=0", "audio_model.encoder_heads"),
        ("features.n_fft=0", "features.n_fft"),
        ("distill.temperature=nan", "distill.temperature"),
        ("run.run_id=a/b", "run.run_id"),
        ("control.listen=nowhere", "control.listen"),
        ("control.metrics_listen=nowhere", "control.metrics_listen"),
    ] {
        let out = std::env::temp_dir().join(format!("xkd-cli-refused-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let (code, _, err) = run(&["run", "--out", &out.display().to_string(), "--set", set]);
        assert_eq!(code, 2, "{set}: {err}");
        assert!(
            err.contains(key),
            "{set}: the error does not name {key}:\n{err}"
        );
        assert!(
            !out.exists(),
            "{set}: the run made {} before refusing",
            out.display()
        );
    }
}

/// `--metrics-listen` on `run` and `coordinator`: an ADDR that is not IP:PORT is a usage error
/// (exit 2); a port already taken fails the run at once, naming the address, before it makes
/// its output directory or starts a worker.
#[test]
fn metrics_listen_is_checked_before_the_run_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for command in ["run", "coordinator"] {
        for bad in ["localhost:9464", "9464", "127.0.0.1"] {
            let (code, _, err) = run(&[command, "--metrics-listen", bad]);
            assert_eq!(code, 2, "{command} --metrics-listen {bad}: {err}");
            assert!(err.contains("--metrics-listen"), "{err}");
        }
        let out = std::env::temp_dir().join(format!("xkd-cli-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let out_arg = out.display().to_string();
        let (code, _, err) = run(&[command, "--out", &out_arg, "--metrics-listen", &addr]);
        assert_eq!(code, 1, "{command}: {err}");
        assert!(
            err.contains(&addr) && err.contains("metrics endpoint"),
            "{command}: the error does not name the address {addr}:\n{err}"
        );
        assert!(
            !out.exists(),
            "{command}: made {} before failing",
            out.display()
        );
    }
}

#[test]
fn bad_checkpoint_store_exits_2_before_any_work() {
    let (code, _, err) = run(&[
        "run",
        "--out",
        &std::env::temp_dir()
            .join(format!("xkd-cli-ckpt-{}", std::process::id()))
            .display()
            .to_string(),
        "--set",
        "checkpoint.url=ftp://host/ckpts",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("checkpoint.url") && err.contains("ftp"),
        "{err}"
    );
    let (code, _, err) = run(&["config", "show", "--set", "checkpoint.keep_last=0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("checkpoint.keep_last"), "{err}");
}

#[test]
fn unreadable_config_file_exits_2_and_names_it() {
    let (code, _, err) = run(&["run", "--config", "/nonexistent/recipe.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/recipe.toml"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[distill\nalpha = ").unwrap();
    let (code, _, err) = run(&["config", "show", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn config_show_prints_the_resolved_default() {
    let (code, out, err) = run(&["config", "show"]);
    assert_eq!(code, 0, "{err}");
    let shown = xkd_config::Config::from_toml(&out).expect("printed config parses");
    assert_eq!(shown, xkd_config::Config::embedded());
    let (_, out, _) = run(&[
        "config",
        "show",
        "--set",
        "distill.direction=audio_to_visual",
    ]);
    assert!(out.contains("direction = \"audio_to_visual\""), "{out}");
}

#[test]
fn device_is_checked_for_form_then_for_cuda_at_startup() {
    let (code, _, err) = run(&["config", "show", "--set", "run.device=gpu"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("run.device") && err.contains("cuda:N"),
        "{err}"
    );
    let (code, _, err) = run(&["config", "show", "--set", "run.device=cuda:x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("run.device"), "{err}");
    // Well formed: `config show` only prints it.
    let (code, out, err) = run(&["config", "show", "--set", "run.device=cuda:0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("device = \"cuda:0\""), "{out}");
    // Running it needs CUDA, which the default build lacks: refused before any work.
    if xkd_worker::train::cuda_compiled() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out").display().to_string();
    let (code, _, err) = run(&["run", "--out", &out_dir, "--set", "run.device=cuda"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("run.device") && err.contains("without the `cuda` feature"),
        "{err}"
    );
    assert!(
        !tmp.path().join("out").exists(),
        "a refused run wrote output"
    );
}

#[test]
fn worker_without_token_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.der");
    std::fs::write(&cert, b"not a cert").unwrap();
    let out = xkd()
        .args(["worker", "--coordinator", "127.0.0.1:9", "--cert"])
        .arg(&cert)
        .env_remove("XKD_JOIN_TOKEN")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("XKD_JOIN_TOKEN"));
}

#[test]
fn worker_takes_a_host_name_and_refuses_an_address_without_port() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.der");
    std::fs::write(&cert, b"not a cert").unwrap();
    let run = |addr: &str| {
        xkd()
            .args(["worker", "--coordinator", addr, "--cert"])
            .arg(&cert)
            .env("XKD_JOIN_TOKEN", "t")
            .output()
            .unwrap()
    };
    let out = run("coordinator-without-port");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("coordinator-without-port"));
    // A name resolves (localhost), and the worker gets as far as the certificate.
    let out = run("localhost:9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn a_malformed_test_hold_exits_2_and_names_it() {
    let out = xkd()
        .args(["config", "show"])
        .env("XKD_TEST_HOLD", "twenty:/tmp/release")
        .output()
        .expect("xkd starts");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("XKD_TEST_HOLD"), "{err}");
}

/// `xkd compare` runs the recipe three times, distilling on the heuristic's hard classes, on all
/// classes and on a random draw of as many, and writes one table beside the three runs.
#[test]
fn compare_distills_on_hard_all_and_random_classes_side_by_side() {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compare");
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("out");
    let mut sets = common::small_recipe(&root.join("cache"), "cmp", 4, 2, 1);
    // Four hard classes of 24, so the controls differ from the heuristic's pick.
    sets.push("heuristic.top_k=4".into());
    let args = common::command_args(&["compare"], &out, &sets);
    let (code, stdout, stderr) = common::xkd(&args, &[]);
    assert_eq!(code, 0, "xkd compare failed:\n{stderr}");
    // Not a terminal: plain text, in its own output and in every worker's log file.
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in a redirected log:\n{stderr}"
    );
    let logs = log_files(&out);
    assert_eq!(logs.len(), 6, "two worker logs per run: {logs:?}");
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains('\x1b'), "escape codes in {}", log.display());
    }
    let table = std::fs::read_to_string(out.join("comparison.md")).expect("comparison.md");
    assert_eq!(stdout, table, "prints the table it writes");
    let report = |mode: &str| -> Value {
        let text = std::fs::read_to_string(out.join(mode).join("report.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let (hard, all, random) = (report("hard"), report("all"), report("random"));
    let picked = names(&hard["hard_classes"]);
    assert_eq!(picked.len(), 4, "{picked:?}");
    assert_eq!(names(&hard["taught_classes"]), picked);
    assert_eq!(names(&all["taught_classes"]).len(), 24);
    let drawn = names(&random["taught_classes"]);
    assert_eq!(drawn.len(), 4);
    assert_ne!(
        drawn, picked,
        "seed 17's draw differs from the heuristic's pick"
    );
    for (r, mode) in [(&hard, "hard"), (&all, "all"), (&random, "random")] {
        assert_eq!(r["distilled_on"], mode);
        assert_eq!(
            names(&r["hard_classes"]),
            picked,
            "one heuristic split in every row"
        );
        let after = r["student"]["after"]["hard"].as_f64().unwrap();
        assert!(
            table.contains(&format!(
                "| {mode} | {} |",
                names(&r["taught_classes"]).len()
            )),
            "{table}"
        );
        assert!(
            table.contains(&format!("{:.1} |", 100.0 * after)),
            "{mode}'s hard-class accuracy after in the table:\n{table}"
        );
        // The synthetic set's construction is in the report, with the heuristic's precision.
        let check = &r["heuristic_vs_construction"];
        assert_eq!(names(&check["built_hard"]).len(), 8, "{check}");
        let hits = picked
            .iter()
            .filter(|c| names(&check["built_hard"]).contains(c))
            .count();
        assert_eq!(check["precision"].as_f64().unwrap(), hits as f64 / 4.0);
    }
}

/// `run.threads_per_worker` sets the compute threads of each worker `xkd run` starts; each
/// says how many it has when it joins.
#[test]
fn threads_per_worker_sets_each_local_workers_compute_threads() {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("threads");
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("out");
    let mut sets = common::small_recipe(&root.join("cache"), "threads", 2, 2, 1);
    sets.push("run.threads_per_worker=2".into());
    let command = ["--log-format", "json", "hard-classes"];
    let args = common::command_args(&command, &out, &sets);
    let (code, _, stderr) = common::xkd(&args, &[]);
    assert_eq!(code, 0, "xkd hard-classes failed:\n{stderr}");
    for rank in 0..2 {
        let log = std::fs::read_to_string(out.join(format!("logs/worker-{rank}.log"))).unwrap();
        let joined: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "joined")
            .collect();
        assert_eq!(joined.len(), 1, "worker {rank} logged:\n{log}");
        assert_eq!(joined[0]["threads"], 2, "worker {rank}");
    }
}

/// Every `*.log` file under `dir`.
fn log_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(log_files(&path));
        } else if path.extension().is_some_and(|e| e == "log") {
            found.push(path);
        }
    }
    found
}

/// A worker pinning the coordinator by fingerprint: a malformed pin is a usage error naming it,
/// and a certificate file that does not have the pinned fingerprint is refused at start,
/// naming both.
#[test]
fn worker_checks_its_pinned_fingerprint_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let worker = |args: &[&str], pin: &str| {
        xkd()
            .args(["worker", "--coordinator", "127.0.0.1:9"])
            .args(args)
            .env("XKD_JOIN_TOKEN", "t")
            .env("XKD_COORDINATOR_FINGERPRINT", pin)
            .env_remove("XKD_COORDINATOR_CERT")
            .output()
            .unwrap()
    };
    let out = worker(&[], "abc");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`abc` is not a SHA-256 fingerprint"), "{err}");

    let id = xkd_protocol::transport::ServerIdentity::generate().unwrap();
    let cert = tmp.path().join("cert.der");
    std::fs::write(&cert, &id.cert_der).unwrap();
    let actual = xkd_protocol::transport::Fingerprint::of(&id.cert_der).to_string();
    let pinned = "ab".repeat(32);
    let out = worker(&["--cert", cert.to_str().unwrap()], &pinned);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&pinned) && err.contains(&actual), "{err}");
}

/// The gradient ring listens where the worker is told (`--collective-interface`,
/// `--collective-host`, or `XKD_COLLECTIVE_INTERFACE` / `XKD_COLLECTIVE_HOST`): an interface this
/// host lacks is named, and the any-address is refused, before the worker joins; both at once
/// is a usage error.
#[test]
fn worker_binds_its_ring_where_told_and_names_what_it_cannot_use() {
    let pin = "ab".repeat(32);
    let worker = |args: &[&str], env: &[(&str, &str)]| {
        xkd()
            .args([
                "worker",
                "--coordinator",
                "127.0.0.1:9",
                "--fingerprint",
                &pin,
            ])
            .args(args)
            .env("XKD_JOIN_TOKEN", "t")
            .env_remove("XKD_COORDINATOR_CERT")
            .env_remove("XKD_COLLECTIVE_HOST")
            .env_remove("XKD_COLLECTIVE_INTERFACE")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let by_flag = worker(&["--collective-interface", "nosuch0"], &[]);
    let by_env = worker(&[], &[("XKD_COLLECTIVE_INTERFACE", "nosuch0")]);
    for out in [by_flag, by_env] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--collective-interface nosuch0: no such interface"),
            "{err}"
        );
    }
    let out = worker(&[], &[("XKD_COLLECTIVE_HOST", "0.0.0.0")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("would listen on every interface"), "{err}");
    let out = worker(
        &[
            "--collective-host",
            "127.0.0.1",
            "--collective-interface",
            "lo",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--collective-interface"), "{err}");
}

/// A certificate the coordinator is given (`--tls-cert`/`--tls-key`, PEM, signed by a CA as
/// cert-manager issues them): the coordinator presents it, logs its fingerprint, and the
/// workers it starts join by that pin. Half a pair is a usage error; a key that is not the
/// certificate's is refused before any work.
#[test]
fn a_given_certificate_is_presented_and_pinned() {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("given-cert");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["xkd.example".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (root.join("tls.crt"), root.join("tls.key"));
    std::fs::write(&cert_path, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());

    let (code, _, err) = run(&["hard-classes", "--tls-cert", cert_arg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-key"), "{err}");

    let other_key = root.join("other.key");
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&other_key, other.serialize_pem()).unwrap();
    let out = root.join("refused");
    let (code, _, err) = run(&[
        "coordinator",
        "--out",
        out.to_str().unwrap(),
        "--tls-cert",
        cert_arg,
        "--tls-key",
        other_key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tls.crt") && err.contains("other.key"),
        "{err}"
    );
    assert!(!out.exists(), "a refused coordinator wrote output");

    let out = root.join("out");
    let sets = common::small_recipe(&root.join("cache"), "given-cert", 2, 2, 1);
    let mut command = vec!["--log-format", "json", "hard-classes"];
    command.extend(["--tls-cert", cert_arg, "--tls-key", key_arg]);
    let args = common::command_args(&command, &out, &sets);
    let (code, _, stderr) = common::xkd(&args, &[]);
    assert_eq!(code, 0, "xkd hard-classes failed:\n{stderr}");
    let pin = xkd_protocol::transport::Fingerprint::of(leaf.der()).to_string();
    let listening = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "coordinator listening");
    assert_eq!(
        listening.map(|v| v["fingerprint"].clone()),
        Some(Value::String(pin)),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("coordinator-cert.der")).unwrap(),
        leaf.der().to_vec()
    );
}
