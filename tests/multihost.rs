//! A job across hosts (issue 16): `xkd coordinator` and two `xkd worker`s, each in a network
//! namespace of its own with its own address on 10.231.0.0/24 (tests/common/netns.rs), joined
//! through a hub; the checkpoint store is a real S3-compatible server (s3s-fs) on a fourth
//! host, reached only over that network. They are launched as deploy/slurm/xkd.sbatch launches
//! them: the coordinator presents a certificate it is given (`--tls-cert`/`--tls-key`) and the
//! workers pin its fingerprint from the environment (`XKD_COORDINATOR_FINGERPRINT`; no
//! certificate file reaches them), bind the gradient ring on the interface named in
//! `XKD_COLLECTIVE_INTERFACE`, and are started again whenever they exit non-zero (75 when the
//! coordinator restarts a generation). Each process has its own working directory and log;
//! the coordinator's output directory is its own.
//!
//! Three runs of one small recipe, one after another:
//! 1. through the hub's kernel bridge, undisturbed;
//! 2. through the test's relay instead of the bridge (tests/common/relay.rs: every frame held
//!    20-50 ms, 1% of frames dropped, UDP and TCP alike): the same parameter digest;
//! 3. through the bridge again, rank 1's host cut off (its port in the hub down) right after
//!    the first checkpoint, while rank 0 is held there (`XKD_TEST_HOLD`): the coordinator
//!    loses the worker, restarts the generation, the cable goes back in, the workers join
//!    again and the run resumes from that checkpoint to the same digest.
//!
//! The hosts share no path the run uses: `run.cache_dir` and the coordinator's `--out` are
//! relative, so each process resolves them in a directory of its own. Each worker makes its
//! own dataset and keeps its own pretrained stand-ins; the distilled student reaches the
//! coordinator and the last evaluation through the store. The test checks each host's cache
//! holds its own copies and the coordinator's output holds the student.
//!
//! Needs root (namespaces); fails, saying so, without it.

mod common;

use common::netns::Network;
use common::relay::{Relay, Shape};
use common::{find, hold_env, is, records, release, report, s3, small_recipe, Background};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const STEPS: u64 = 30;
const EVERY: u64 = 10;
/// A run takes tens of seconds; this only keeps a stuck one from hanging the suite.
const LIMIT: Duration = Duration::from_secs(300);
const COORDINATOR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const WORKERS: [(&str, Ipv4Addr); 2] = [
    ("worker-a", Ipv4Addr::new(10, 231, 0, 11)),
    ("worker-b", Ipv4Addr::new(10, 231, 0, 12)),
];
const STORE: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 20);
const PORT: u16 = 7733;
const S3_PORT: u16 = 9000;
const TOKEN: &str = "multihost-test-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("multihost")
}

/// What every run of the test shares: the hosts, the store, the coordinator's certificate.
struct Cluster {
    // Dropped in this order: the store's process before its namespace.
    store: Store,
    net: Network,
    tls: [PathBuf; 2],
    pin: String,
}

impl Cluster {
    fn start() -> Cluster {
        let mut hosts = vec![("coordinator", COORDINATOR), ("store", STORE)];
        hosts.extend(WORKERS);
        let net = Network::create(&hosts);
        let _ = std::fs::remove_dir_all(root());
        std::fs::create_dir_all(root()).unwrap();
        let store = Store::start(&net);
        let (tls, pin) = certificate(&root().join("tls"));
        Cluster {
            store,
            net,
            tls,
            pin,
        }
    }

    /// The recipe every run uses, as `--set` values; the runs differ only in run id.
    fn recipe(&self, run_id: &str) -> Vec<String> {
        // Relative: each process's own working directory, as if on a disk of its own.
        let mut sets = small_recipe(Path::new("cache"), run_id, STEPS, EVERY, 3);
        sets.push(format!("checkpoint.url=\"{}\"", self.store.url()));
        // A cut-off worker is declared lost after 5 s rather than 10.
        sets.push("control.heartbeat_timeout_ms=5000".into());
        sets
    }

    /// Starts run `name`: the coordinator and one worker launcher per worker host. `env` goes
    /// to the workers.
    fn launch(&self, name: &str, env: &[(String, String)]) -> Job {
        let dir = root().join(name);
        let home = dir.join("coordinator");
        std::fs::create_dir_all(&home).unwrap();
        let config = dir.join("empty.toml");
        std::fs::write(&config, "").unwrap();
        let mut c = self.net.command("coordinator", env!("CARGO_BIN_EXE_xkd"));
        c.args(["--log-format", "json", "coordinator", "--config"])
            .arg(&config)
            .args(["--out", "out"])
            .args([
                "--listen",
                &SocketAddr::from((COORDINATOR, PORT)).to_string(),
            ])
            .arg("--tls-cert")
            .arg(&self.tls[0])
            .arg("--tls-key")
            .arg(&self.tls[1])
            .args(["--set", "control.workers=2"])
            .current_dir(&home)
            .env("XKD_JOIN_TOKEN", TOKEN)
            .envs(self.store.env());
        for set in self.recipe(name) {
            c.args(["--set", &set]);
        }
        let mut coordinator = Background::spawn(c, &dir.join("coordinator.log"));
        coordinator.wait_for("the coordinator listening", LIMIT, |r| {
            r["message"] == "coordinator listening"
        });
        let mut worker_env = vec![
            ("XKD_JOIN_TOKEN".to_string(), TOKEN.to_string()),
            ("XKD_COORDINATOR_FINGERPRINT".into(), self.pin.clone()),
            ("XKD_COLLECTIVE_INTERFACE".into(), "eth0".into()),
        ];
        worker_env.extend(self.store.env());
        worker_env.extend_from_slice(env);
        let workers = WORKERS
            .iter()
            .map(|(host, _)| {
                let wdir = dir.join(host);
                std::fs::create_dir_all(&wdir).unwrap();
                Launcher::start(self.net.namespace(host), worker_env.clone(), wdir)
            })
            .collect();
        Job {
            out: home.join("out"),
            dir,
            coordinator,
            workers,
        }
    }

    /// `xkd checkpoint digest` of the run's last checkpoint, asked from the coordinator's host.
    fn digest(&self, run_id: &str) -> String {
        let url = format!("{}/{run_id}/ckpt/{STEPS:010}", self.store.url());
        let out = self
            .net
            .command("coordinator", env!("CARGO_BIN_EXE_xkd"))
            .args(["checkpoint", "digest", "--json", &url])
            .envs(self.store.env())
            .output()
            .expect("xkd checkpoint digest runs");
        assert!(
            out.status.success(),
            "xkd checkpoint digest {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["sha256"].as_str().expect("sha256").to_string()
    }
}

/// One run: the coordinator and its workers' launchers.
struct Job {
    dir: PathBuf,
    out: PathBuf,
    coordinator: Background,
    workers: Vec<Launcher>,
}

impl Job {
    /// Waits for the coordinator to exit 0 and its workers to finish; the coordinator's log.
    fn finish(self) -> Vec<Value> {
        let Job {
            out,
            coordinator,
            workers,
            dir,
        } = self;
        let (code, text) = coordinator.wait(LIMIT);
        assert_eq!(code, 0, "the coordinator failed:\n{text}");
        for w in workers {
            w.finish();
        }
        let log = records(&dir.join("coordinator.log"));
        let r = report(&out);
        assert_eq!(r["workers"], 2, "{r}");
        assert_eq!(r["steps"], STEPS, "{r}");
        assert!(
            out.join("student.safetensors").is_file(),
            "no student in {}",
            out.display()
        );
        // Each worker host made its own dataset and pretrained stand-ins, in its own cache.
        for (host, _) in WORKERS {
            let models = dir.join(host).join("cache/models");
            let count = std::fs::read_dir(&models)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| is_safetensors(&e.path()))
                        .count()
                })
                .unwrap_or(0);
            assert_eq!(
                count,
                2,
                "{host} keeps both stand-ins in {}",
                models.display()
            );
        }
        assert!(
            !dir.join("coordinator/cache").exists(),
            "the coordinator made a cache"
        );
        log
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// The records of both workers' logs of the run in `dir`.
fn worker_records(dir: &Path) -> Vec<Value> {
    WORKERS
        .iter()
        .flat_map(|(host, _)| records(&dir.join(host).join("worker.log")))
        .collect()
}

#[test]
fn a_job_across_hosts_survives_delay_loss_and_a_cut_link() {
    let started = Instant::now();
    let cluster = Cluster::start();

    // 1. Undisturbed, through the bridge.
    let t = Instant::now();
    let job = cluster.launch("whole", &[]);
    let dir = job.dir.clone();
    let log = job.finish();
    let want = checked_digest(&cluster, "whole", &dir);
    check_addresses(&log, &dir);
    eprintln!("undisturbed run: {:.1} s", t.elapsed().as_secs_f64());

    // 2. Through the relay: delay and loss on every link.
    let t = Instant::now();
    cluster.net.set_bridged(false);
    let ports = cluster.net.ports();
    let shape = Shape {
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        loss: 0.01,
        seed: 16,
    };
    let relay = cluster.net.within_hub(move || Relay::start(&ports, shape));
    let job = cluster.launch("lossy", &[]);
    let dir = job.dir.clone();
    job.finish();
    let counts = relay.counts.clone();
    drop(relay);
    cluster.net.set_bridged(true);
    eprintln!(
        "run through the relay: {:.1} s; {counts}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(checked_digest(&cluster, "lossy", &dir), want);
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    assert!(
        n(&counts.tcp_forwarded) > 1000 && n(&counts.udp_forwarded) > 100,
        "the run's traffic did not pass the relay: {counts}"
    );
    assert!(
        n(&counts.tcp_dropped) + n(&counts.udp_dropped) > 0,
        "the relay dropped nothing: {counts}"
    );
    assert_eq!(
        n(&counts.send_errors),
        0,
        "frames the relay could not send: {counts}"
    );

    // 3. Rank 1's host cut off after the first checkpoint, while rank 0 is held there.
    let t = Instant::now();
    let release_file = root().join("cut.release");
    let mut job = cluster.launch("cut", &[hold_env(EVERY, &release_file)]);
    let joined = job.coordinator.wait_for("rank 1's join", LIMIT, |r| {
        is(r, "worker joined", "rank", 1)
    });
    let cut = host_of(&joined);
    job.coordinator
        .wait_for("the first checkpoint", LIMIT, |r| {
            is(r, "checkpoint committed", "step", EVERY)
        });
    let dir = job.dir.clone();
    job.coordinator.wait_until("rank 0 held", LIMIT, || {
        worker_records(&dir)
            .iter()
            .any(|r| is(r, "held for a test", "step", EVERY))
            .then_some(())
    });
    cluster.net.set_link(cut, false);
    release(&release_file);
    job.coordinator.wait_for("the restart", LIMIT, |r| {
        r["message"] == "restarting the workers"
    });
    cluster.net.set_link(cut, true);
    let log = job.finish();
    eprintln!("run with {cut} cut off: {:.1} s", t.elapsed().as_secs_f64());
    let resumed = find(&log, "resuming distillation from checkpoint");
    assert_eq!(resumed.len(), 1, "{log:#?}");
    assert_eq!(resumed[0]["step"], EVERY);
    assert_eq!(checked_digest(&cluster, "cut", &dir), want);
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}

/// The store's digest of the run's last checkpoint, which must be the one its report gives.
fn checked_digest(cluster: &Cluster, run_id: &str, dir: &Path) -> String {
    let digest = cluster.digest(run_id);
    let r = report(&dir.join("coordinator/out"));
    assert_eq!(
        r["student_digest"].as_str(),
        Some(digest.as_str()),
        "the report's digest is not the store's"
    );
    digest
}

/// The hosts' own addresses are what the coordinator saw and what the ring bound.
fn check_addresses(log: &[Value], dir: &Path) {
    let joined = find(log, "worker joined");
    assert_eq!(joined.len(), 2, "{log:#?}");
    let mut seen: Vec<&str> = joined.iter().map(|r| host_of(r)).collect();
    seen.sort_unstable();
    assert_eq!(seen, ["worker-a", "worker-b"]);
    let rings: Vec<String> = worker_records(dir)
        .iter()
        .filter(|r| r["message"] == "joined")
        .map(|r| r["ring"].as_str().expect("the ring's address").to_string())
        .collect();
    assert_eq!(rings.len(), 2, "{rings:?}");
    for (host, addr) in WORKERS {
        assert!(
            rings.iter().any(|r| r.starts_with(&format!("{addr}:"))),
            "{host}'s ring is not on its address {addr}: {rings:?}"
        );
    }
}

/// The worker host a `worker joined` record came from (its `remote` address).
fn host_of(joined: &Value) -> &'static str {
    let remote: SocketAddr = joined["remote"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no remote address in {joined}"));
    WORKERS
        .iter()
        .find(|(_, a)| remote.ip() == *a)
        .map(|(h, _)| *h)
        .unwrap_or_else(|| panic!("a worker joined from {remote}, no worker host's address"))
}

/// A certificate and key as an operator provisions them, and the certificate's fingerprint.
fn certificate(dir: &Path) -> ([PathBuf; 2], String) {
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["xkd-coordinator.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let paths = [dir.join("tls.crt"), dir.join("tls.key")];
    std::fs::write(&paths[0], cert.pem()).unwrap();
    std::fs::write(&paths[1], key.serialize_pem()).unwrap();
    let pin = xkd_protocol::transport::Fingerprint::of(cert.der()).to_string();
    (paths, pin)
}

/// s3s-fs on the store's host, its root under the test's directory; killed on drop.
struct Store {
    child: Child,
    secret: String,
}

impl Store {
    fn start(net: &Network) -> Store {
        let data = root().join("store");
        std::fs::create_dir_all(data.join(s3::BUCKET)).unwrap();
        let secret = format!("multihost-secret-{}", std::process::id());
        let child = net
            .command("store", s3::s3s_fs_binary())
            .args(["--host", &STORE.to_string(), "--port", &S3_PORT.to_string()])
            .args(["--access-key", "multihost", "--secret-key", &secret])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let store = Store { child, secret };
        // Ready once a host of the network reaches it.
        net.within("coordinator", || {
            let addr = SocketAddr::from((STORE, S3_PORT));
            let start = Instant::now();
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "s3s-fs does not answer on {addr}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        store
    }

    fn url(&self) -> String {
        format!("s3://{}/multihost", s3::BUCKET)
    }

    /// The AWS variables that point a client on the network at the store.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://{STORE}:{S3_PORT}")),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "multihost".into()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One worker host's launcher, as the sbatch script's loop: `xkd worker` in the host's
/// namespace, started again when it exits non-zero, until it exits 0. Its log is
/// `dir/worker.log`, appended to by every start. Stopped (the worker killed) on drop.
struct Launcher {
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    log: PathBuf,
}

impl Launcher {
    fn start(namespace: String, env: Vec<(String, String)>, dir: PathBuf) -> Launcher {
        let log = dir.join("worker.log");
        let (stop, finished) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, f, path) = (stop.clone(), finished.clone(), log.clone());
        let thread = std::thread::spawn(move || loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("the worker's log");
            let mut child = Command::new("ip")
                .args(["netns", "exec", &namespace, env!("CARGO_BIN_EXE_xkd")])
                .args(["--log-format", "json", "worker", "--coordinator"])
                .arg(SocketAddr::from((COORDINATOR, PORT)).to_string())
                .current_dir(&dir)
                .env_remove("XKD_COORDINATOR_CERT")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("xkd worker starts");
            let status = loop {
                if s.load(Ordering::Relaxed) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if status.success() {
                f.store(true, Ordering::Relaxed);
                return;
            }
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut l| {
                    use std::io::Write;
                    writeln!(l, "worker exited {status}; starting it again")
                });
            std::thread::sleep(Duration::from_millis(500));
        });
        Launcher {
            stop,
            finished,
            thread: Some(thread),
            log,
        }
    }

    /// Waits (a few seconds: the coordinator has already ended the run) for the worker to
    /// exit 0.
    fn finish(mut self) {
        let start = Instant::now();
        while !self.finished.load(Ordering::Relaxed) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the worker did not finish after the coordinator:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
