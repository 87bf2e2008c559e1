//! Fixtures shared by the store tests: one store per test, on a local directory or on a real
//! S3-compatible server, and ways to damage what it holds the way disks and people do.

#![allow(dead_code)]

pub mod s3;

use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use xkd_checkpoint::{Env, ObjectEntry, Retry, Store, StoreOptions};

/// Retry settings for tests: quick back-off, but long enough in total to ride out a restart.
pub fn test_retry() -> Retry {
    Retry {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        base: 2.0,
        max_retries: 200,
        retry_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

/// A store under test and what keeps its backend alive.
pub struct Fixture {
    pub store: Store,
    pub backend: Backend,
}

pub enum Backend {
    File(tempfile::TempDir),
    S3(s3::S3Server),
}

impl Fixture {
    /// A store in a fresh local directory, opened by `file://` URL.
    pub fn file() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("file://{}/store", dir.path().display());
        let store = Store::open_with(&url, options(Env::Process)).expect("open file store");
        Fixture {
            store,
            backend: Backend::File(dir),
        }
    }

    /// A store on a fresh s3s-fs server, under prefix `team/runs`.
    pub fn s3() -> Fixture {
        let server = s3::S3Server::start();
        let store = Store::open_with(
            &server.url("team/runs"),
            options(Env::Explicit(server.env())),
        )
        .expect("open s3 store");
        Fixture {
            store,
            backend: Backend::S3(server),
        }
    }

    /// A second handle on the same store with other upload settings.
    pub fn reopen(&self, mut opts: StoreOptions) -> Store {
        opts.env = match &self.backend {
            Backend::File(_) => Env::Process,
            Backend::S3(server) => Env::Explicit(server.env()),
        };
        Store::open_with(&self.store.url(), opts).expect("reopen")
    }

    pub fn server(&mut self) -> &mut s3::S3Server {
        match &mut self.backend {
            Backend::S3(server) => server,
            Backend::File(_) => panic!("not an S3 fixture"),
        }
    }

    /// The file on disk that holds object `name` of `run`/`step`.
    pub fn file_of(&self, run: &str, step: u64, name: &str) -> PathBuf {
        let rel = format!("{run}/ckpt/{step:010}/{name}");
        match &self.backend {
            Backend::File(dir) => dir.path().join("store").join(rel),
            Backend::S3(server) => server.file_of(&format!("team/runs/{rel}")),
        }
    }

    /// Flips the bits of one byte in the middle of an object.
    pub fn corrupt(&self, run: &str, step: u64, name: &str) {
        let path = self.file_of(run, step, name);
        let mut bytes = std::fs::read(&path).expect("read object file");
        let i = bytes.len() / 2;
        bytes[i] ^= 0xff;
        std::fs::write(&path, bytes).expect("write object file");
    }

    /// Removes an object behind the store's back.
    pub fn remove(&self, run: &str, step: u64, name: &str) {
        std::fs::remove_file(self.file_of(run, step, name)).expect("remove object file");
    }

    /// Cuts an object short by one byte.
    pub fn truncate(&self, run: &str, step: u64, name: &str) {
        let path = self.file_of(run, step, name);
        let bytes = std::fs::read(&path).expect("read object file");
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write object file");
    }

    /// Writes and commits a checkpoint with the usual three objects; the parameters are a
    /// function of `seed`.
    pub async fn save(&self, run: &str, step: u64, seed: u8) -> Vec<ObjectEntry> {
        let mut entries = Vec::new();
        for (name, bytes) in checkpoint_objects(seed, step) {
            let e = self
                .store
                .put_object(run, step, name, bytes)
                .await
                .expect("put");
            entries.push(e);
        }
        self.store
            .commit(run, step, &entries)
            .await
            .expect("commit");
        entries
    }
}

pub fn options(env: Env) -> StoreOptions {
    StoreOptions {
        env,
        retry: test_retry(),
        ..StoreOptions::default()
    }
}

/// The objects of a small checkpoint.
pub fn checkpoint_objects(seed: u8, step: u64) -> Vec<(&'static str, Bytes)> {
    let state = format!("{{\"step\": {step}, \"seed\": {seed}}}\n");
    vec![
        ("student.safetensors", Bytes::from(params(seed, None))),
        (
            "optimizer.safetensors",
            Bytes::from(params(seed.wrapping_add(1), None)),
        ),
        ("state.json", Bytes::from(state)),
    ]
}

/// A safetensors file of two f32 tensors whose values are a function of `seed`, with optional
/// file metadata (which the parameter digest must ignore).
pub fn params(seed: u8, metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let a: Vec<u8> = (0..24u8)
        .flat_map(|i| f32::from(i ^ seed).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..8u8)
        .flat_map(|i| f32::from(i.wrapping_mul(seed)).to_le_bytes())
        .collect();
    let view = |shape: Vec<usize>, data| {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, data).expect("view")
    };
    safetensors::serialize(
        [
            ("lora.a.weight".to_string(), view(vec![4, 6], &a)),
            ("lora.b.weight".to_string(), view(vec![8], &b)),
        ],
        metadata,
    )
    .expect("serialize")
}
