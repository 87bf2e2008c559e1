//! `deploy/slurm/xkd.sbatch` on a real Slurm: Debian's slurm-wlm (slurmctld, slurmd, munge)
//! started on this machine by tests/slurm/start.sh (which installs it with apt-get if needed;
//! both need root). The job runs `xkd coordinator` and, through `srun`, one `xkd worker` per
//! task. One job runs undisturbed; in a second, a worker is killed after the first checkpoint:
//! the coordinator restarts the generation, the script starts the workers again, and the run
//! finishes from the checkpoint.
//!
//! Trust passes through no file: the workers join by the certificate's fingerprint alone.
//! The first job's coordinator presents a pair the script makes in a private directory (which
//! is gone after the job), with a certificate path in the job's environment that does not
//! exist (a worker that read it would fail); the second presents a pair the operator gives
//! (`XKD_TLS_CERT`, `XKD_TLS_KEY`), and its fingerprint is the one the coordinator logs.

mod common;

use common::{find, held, hold_env, is, records, release, report, signal, small_recipe};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A job takes seconds; this only keeps a stuck one from hanging the suite.
const LIMIT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("slurm")
}

/// The cluster's daemons, stopped when the test ends however it ends.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = root().join("cluster");
        let out = Command::new("tests/slurm/start.sh")
            .arg(&dir)
            .output()
            .expect("tests/slurm/start.sh runs");
        assert!(
            out.status.success(),
            "the Slurm cluster did not start:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Cluster { dir, conf }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("tests/slurm/start.sh")
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A UDP port nothing listens on now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `sbatch` of the launch script with `tasks` tasks in the background; its output file.
/// `env` is added to the job's environment (Slurm passes it to every task).
fn submit(
    cluster: &Cluster,
    name: &str,
    tasks: usize,
    env: &[(String, String)],
) -> (std::process::Child, PathBuf, PathBuf) {
    let base = root().join(name);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (out, job_out) = (base.join("out"), base.join("job.out"));
    let config = base.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let mut sbatch = cluster.command("sbatch");
    sbatch
        .args(["--wait", &format!("--ntasks={tasks}"), "--job-name", name])
        .arg(format!("--output={}", job_out.display()))
        .arg("deploy/slurm/xkd.sbatch")
        .arg(&config)
        .arg(&out);
    let recipe = small_recipe(&root().join("cache"), name, 40, 10, 2);
    for set in &recipe {
        sbatch.args(["--set", set]);
    }
    sbatch
        .env("XKD", env!("CARGO_BIN_EXE_xkd"))
        .env("XKD_PORT", free_udp_port().to_string())
        .env("XKD_LOG_FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k, v)));
    let child = sbatch.spawn().expect("sbatch starts");
    (child, job_out, out)
}

/// Waits for `sbatch --wait`; the job's exit status and its output.
fn finish(mut child: std::process::Child, job_out: &Path) -> (i32, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the job did not end within {LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(job_out).unwrap_or_default();
    (status.code().unwrap_or(-1), text)
}

/// Polls the job's output until a record satisfies `pred`.
fn wait_for(job_out: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll(&format!("{what} in {}", job_out.display()), || {
        records(job_out).into_iter().find(|r| pred(r))
    })
}

/// Polls `found` until it gives something, at most LIMIT.
fn poll<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(hit) = found() {
            return hit;
        }
        assert!(start.elapsed() < LIMIT, "no {what} within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A certificate and key as an operator provisions them (PEM files on the first node), as
/// the job's `XKD_TLS_CERT`/`XKD_TLS_KEY`, and the certificate's fingerprint.
fn operator_pair(dir: &Path) -> ([(String, String); 2], String) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["xkd-slurm.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let env = [
        ("XKD_TLS_CERT".to_string(), cert_path.display().to_string()),
        ("XKD_TLS_KEY".to_string(), key_path.display().to_string()),
    ];
    let pin = xkd_protocol::transport::Fingerprint::of(cert.der()).to_string();
    (env, pin)
}

#[test]
fn the_launch_script_runs_a_job_and_restarts_a_killed_worker() {
    let cluster = Cluster::start();

    // Undisturbed: two tasks join as ranks 0 and 1, the run finishes and reports.
    let tmp = root().join("whole-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let env = [
        ("TMPDIR".to_string(), tmp.display().to_string()),
        (
            "XKD_COORDINATOR_CERT".to_string(),
            "/nonexistent/coordinator-cert.der".to_string(),
        ),
    ];
    let (child, job_out, out) = submit(&cluster, "whole", 2, &env);
    let (code, text) = finish(child, &job_out);
    assert_eq!(code, 0, "the job failed:\n{text}");
    let log = records(&job_out);
    assert_eq!(find(&log, "worker joined").len(), 2, "{text}");
    let listening = find(&log, "coordinator listening");
    assert_eq!(listening.len(), 1, "{text}");
    assert!(
        listening[0]["fingerprint"]
            .as_str()
            .is_some_and(|f| f.len() == 64),
        "{text}"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(
        left.is_empty(),
        "the private key pair outlived the job: {left:?}"
    );
    assert!(
        text.contains("# xkd run whole"),
        "the report is printed:\n{text}"
    );
    let whole = report(&out);
    assert_eq!(whole["workers"], 2);
    assert_eq!(whole["steps"], 40);
    for rank in 0..2 {
        let worker = std::fs::read_to_string(out.join(format!("logs/worker-{rank}.log")))
            .expect("each task logs into OUT/logs");
        assert!(worker.contains("run finished"), "rank {rank}:\n{worker}");
    }

    // A worker SIGKILLed after the first checkpoint, while rank 0 is held there: the script
    // starts it again, the coordinator resumes from that checkpoint and the run ends with the
    // same parameters.
    let release_file = root().join("killed.release");
    let (given, pin) = operator_pair(&root().join("killed-tls"));
    let mut env = vec![hold_env(10, &release_file)];
    env.extend(given);
    let (child, job_out, out) = submit(&cluster, "killed", 2, &env);
    let joined = wait_for(&job_out, "rank 1's join", |r| {
        is(r, "worker joined", "rank", 1)
    });
    wait_for(&job_out, "the first checkpoint", |r| {
        is(r, "checkpoint committed", "step", 10)
    });
    poll("rank 0 held", || held(&out, 10).then_some(()));
    signal(joined["pid"].as_i64().expect("pid"), "-KILL");
    release(&release_file);
    let (code, text) = finish(child, &job_out);
    assert_eq!(code, 0, "the job failed:\n{text}");
    let log = records(&job_out);
    let listening = find(&log, "coordinator listening");
    assert_eq!(listening.len(), 1, "{text}");
    assert_eq!(listening[0]["fingerprint"], pin.as_str(), "{text}");
    let resumed = find(&log, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{text}");
    assert_eq!(resumed[0]["step"], 10, "{text}");
    assert!(
        find(&log, "worker joined").len() >= 4,
        "a second generation joined:\n{text}"
    );
    let worker = std::fs::read_to_string(out.join("logs/worker-1.log")).unwrap();
    assert!(
        worker.contains("starting it again"),
        "the script restarted rank 1:\n{worker}"
    );
    let killed = report(&out);
    assert_eq!(killed["student_digest"], whole["student_digest"]);
}
