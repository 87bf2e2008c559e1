//! A real S3-compatible server (s3s-fs) on 127.0.0.1 for tests: one process per test, its own
//! port, root directory, bucket and keys; killed on drop. Shared by the crate's tests and the
//! `xkd` package's CLI tests (included by path).

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every test server serves.
pub const BUCKET: &str = "ckpt";

/// One running (or stopped) s3s-fs process.
pub struct S3Server {
    exe: PathBuf,
    root: tempfile::TempDir,
    port: u16,
    access_key: String,
    secret_key: String,
    child: Option<Child>,
}

/// Where s3s-fs is: `$XKD_S3S_FS`, else `<workspace>/.tools/bin/s3s-fs`. Panics with the
/// install command when neither exists: these tests must not pass by skipping.
pub fn s3s_fs_binary() -> PathBuf {
    let tools = workspace_root().join(".tools");
    let p = match std::env::var_os("XKD_S3S_FS") {
        Some(p) => PathBuf::from(p),
        None => tools.join("bin/s3s-fs"),
    };
    assert!(
        p.is_file(),
        "the S3 tests need s3s-fs, a real S3-compatible server, and {} is not a file; \
         install it with\n  \
         cargo install s3s-fs@0.14.1 --features binary --locked --root {}\n\
         or point XKD_S3S_FS at an s3s-fs binary",
        p.display(),
        tools.display()
    );
    p
}

fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").is_file() {
        assert!(
            dir.pop(),
            "no Cargo.lock above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
    dir
}

impl S3Server {
    /// Starts a server on a free port with a fresh root and bucket, and waits until it
    /// accepts connections.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket dir");
        let port = free_port();
        let mut server = S3Server {
            exe: s3s_fs_binary(),
            root,
            port,
            access_key: format!("test-key-{port}"),
            secret_key: format!("test-secret-{}-{}", port, std::process::id()),
            child: None,
        };
        server.resume();
        server
    }

    /// Kills the process (the data stays on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port and root.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let child = Command::new(&self.exe)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.exe.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "s3s-fs exited before serving on port {}: {status}",
                    self.port
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The store URL of the bucket, with an optional prefix.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The standard AWS variables that point a client at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The secret key, so tests can check it never shows up in output.
    pub fn secret(&self) -> &str {
        &self.secret_key
    }

    /// Where the server keeps object `key` of the bucket on disk.
    pub fn file_of(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// The server's root directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}
