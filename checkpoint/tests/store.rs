//! The store's contract, run against a local directory and against a real S3-compatible server
//! (s3s-fs on 127.0.0.1): commit, list, verify, prune, digest, and the create-only manifest.

mod common;

use bytes::Bytes;
use common::Fixture;
use std::collections::HashMap;
use xkd_checkpoint::{
    Env, Error, ObjectEntry, ObjectStatus, Retry, Store, StoreOptions, MANIFEST, STUDENT,
};

/// Runs each scenario once per backend: `<scenario>::file` and `<scenario>::s3`.
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn file() {
                super::$scenario(super::Fixture::file()).await
            }
            #[tokio::test]
            async fn s3() {
                super::$scenario(super::Fixture::s3()).await
            }
        }
    )*};
}

on_every_backend!(
    commit_then_list_verify_and_read,
    manifest_is_create_only,
    commit_refuses_objects_not_in_the_store,
    uncommitted_checkpoints_do_not_exist,
    corrupt_byte_is_named_and_skipped_on_resume,
    missing_and_truncated_objects_are_reported,
    prune_keeps_the_newest_and_cleans_leftovers,
    digest_depends_on_parameters_only,
    large_objects_go_up_in_parts,
    prefixes_come_down_in_ranges,
    directories_go_up_and_resume,
    files_stream_up_with_their_hash,
    run_objects_are_replaced_whole_and_absent_is_none,
);

const RUN: &str = "run-7";

async fn commit_then_list_verify_and_read(fx: Fixture) {
    let first = fx.save(RUN, 100, 1).await;
    fx.save(RUN, 200, 2).await;
    let listed = fx.store.list(RUN).await.unwrap();
    let steps: Vec<u64> = listed.iter().map(|l| l.step).collect();
    assert_eq!(steps, [200, 100], "newest first");
    let m = listed[1].manifest.as_ref().unwrap();
    assert_eq!((m.run_id.as_str(), m.step, m.format_version), (RUN, 100, 1));
    let names: Vec<&str> = m.objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        ["optimizer.safetensors", "state.json", "student.safetensors"]
    );
    assert_eq!(m.total_size(), first.iter().map(|e| e.size).sum::<u64>());
    assert!(m.age().as_secs() < 60);
    assert!(
        listed[0].url.ends_with("/run-7/ckpt/0000000200"),
        "{}",
        listed[0].url
    );

    let v = fx.store.verify(RUN, 100).await.unwrap();
    assert!(v.is_ok(), "{}", v.problems());
    assert_eq!(v.objects.len(), 3);
    let student = fx.store.get_object(RUN, 100, STUDENT).await.unwrap();
    assert_eq!(student, Bytes::from(common::params(1, None)));
    assert_eq!(fx.store.read_verified(m, STUDENT).await.unwrap(), student);
    let e = fx.store.read_verified(m, "nope.bin").await.unwrap_err();
    assert!(matches!(e, Error::NotInManifest { .. }), "{e}");
    assert!(fx.store.list("other-run").await.unwrap().is_empty());
}

async fn manifest_is_create_only(fx: Fixture) {
    let entries = fx.save(RUN, 300, 1).await;
    let before = fx.store.get_object(RUN, 300, "state.json").await.unwrap();
    let original = fx.store.manifest(RUN, 300).await.unwrap();

    // Same objects again (a retried commit whose answer was lost): the original stands.
    let again = fx.store.commit(RUN, 300, &entries).await.unwrap();
    assert_eq!(again, original);

    // Different objects: refused, and the manifest is untouched.
    let other = fx
        .store
        .put_object(RUN, 300, "extra.bin", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let mut more = entries.clone();
    more.push(other);
    let e = fx.store.commit(RUN, 300, &more).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyCommitted { .. }), "{e}");
    assert!(e.to_string().contains("0000000300"), "{e}");
    assert_eq!(fx.store.manifest(RUN, 300).await.unwrap(), original);
    assert_eq!(
        fx.store.get_object(RUN, 300, "state.json").await.unwrap(),
        before
    );

    // MANIFEST.json cannot be written as an object either.
    let e = fx
        .store
        .put_object(RUN, 300, MANIFEST, Bytes::from_static(b"{}"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadObjectName { .. }), "{e}");
}

async fn commit_refuses_objects_not_in_the_store(fx: Fixture) {
    let ok = fx
        .store
        .put_object(RUN, 5, "a.bin", Bytes::from_static(b"abc"))
        .await
        .unwrap();
    let ghost = ObjectEntry::of("ghost.bin", b"never written");
    let e = fx
        .store
        .commit(RUN, 5, &[ok.clone(), ghost])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ghost.bin"), "{e}");
    let wrong_size = ObjectEntry { size: 4, ..ok };
    let e = fx.store.commit(RUN, 5, &[wrong_size]).await.unwrap_err();
    assert!(e.to_string().contains("a.bin"), "{e}");
    assert!(
        fx.store.list(RUN).await.unwrap().is_empty(),
        "nothing committed"
    );
}

async fn uncommitted_checkpoints_do_not_exist(fx: Fixture) {
    for (name, bytes) in common::checkpoint_objects(3, 10) {
        fx.store.put_object(RUN, 10, name, bytes).await.unwrap();
    }
    assert!(fx.store.list(RUN).await.unwrap().is_empty());
    let resume = fx.store.newest_verified(RUN).await.unwrap();
    assert!(resume.checkpoint.is_none() && resume.skipped.is_empty());
    let e = fx.store.verify(RUN, 10).await.unwrap_err();
    assert!(matches!(e, Error::NotCommitted { .. }), "{e}");
    assert!(e.to_string().contains("0000000010"), "{e}");
}

async fn corrupt_byte_is_named_and_skipped_on_resume(fx: Fixture) {
    fx.save(RUN, 400, 1).await;
    fx.save(RUN, 500, 2).await;
    fx.corrupt(RUN, 500, STUDENT);

    let v = fx.store.verify(RUN, 500).await.unwrap();
    assert!(!v.is_ok());
    let bad: Vec<&str> = v.bad().map(|o| o.name.as_str()).collect();
    assert_eq!(bad, [STUDENT]);
    assert!(matches!(
        v.bad().next().unwrap().status,
        ObjectStatus::Sha256Mismatch { .. }
    ));
    assert!(
        v.problems()
            .contains("student.safetensors: sha256 mismatch"),
        "{}",
        v.problems()
    );

    let resume = fx.store.newest_verified(RUN).await.unwrap();
    assert_eq!(resume.checkpoint.as_ref().map(|m| m.step), Some(400));
    assert_eq!(resume.skipped.len(), 1);
    assert_eq!(resume.skipped[0].step, 500);
    assert!(
        resume.skipped[0].reason.contains(STUDENT),
        "{:?}",
        resume.skipped
    );

    let e = fx.store.digest(RUN, 500).await.unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains(STUDENT),
        "{e}"
    );
    let m = fx.store.manifest(RUN, 500).await.unwrap();
    assert!(fx.store.read_verified(&m, STUDENT).await.is_err());
}

async fn missing_and_truncated_objects_are_reported(fx: Fixture) {
    fx.save(RUN, 1, 1).await;
    fx.save(RUN, 2, 2).await;
    fx.remove(RUN, 2, "state.json");
    fx.truncate(RUN, 2, "optimizer.safetensors");
    let v = fx.store.verify(RUN, 2).await.unwrap();
    let bad: Vec<(&str, &ObjectStatus)> = v.bad().map(|o| (o.name.as_str(), &o.status)).collect();
    assert_eq!(bad.len(), 2, "{}", v.problems());
    assert_eq!(bad[1], ("state.json", &ObjectStatus::Missing));
    assert_eq!(bad[0].0, "optimizer.safetensors");
    assert!(
        matches!(bad[0].1, ObjectStatus::SizeMismatch { .. }),
        "{}",
        v.problems()
    );

    // A manifest that is itself damaged is reported, and resume falls back past it.
    fx.corrupt(RUN, 1, MANIFEST);
    let listed = fx.store.list(RUN).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[1].manifest.is_err());
    let resume = fx.store.newest_verified(RUN).await.unwrap();
    assert!(resume.checkpoint.is_none());
    assert_eq!(resume.skipped.len(), 2, "{:?}", resume.skipped);
    assert!(
        resume.skipped[1].reason.contains("manifest"),
        "{:?}",
        resume.skipped
    );
}

async fn run_objects_are_replaced_whole_and_absent_is_none(fx: Fixture) {
    let name = "decisions.json";
    assert_eq!(fx.store.get_run_object(RUN, name).await.unwrap(), None);
    let first = Bytes::from_static(b"{\"a\":1}");
    let entry = fx
        .store
        .put_run_object(RUN, name, first.clone())
        .await
        .unwrap();
    assert_eq!(entry, ObjectEntry::of(name, &first));
    let second = Bytes::from(vec![7u8; 9 << 20]); // above the multipart threshold: one put
    fx.store
        .put_run_object(RUN, name, second.clone())
        .await
        .unwrap();
    assert_eq!(
        fx.store.get_run_object(RUN, name).await.unwrap(),
        Some(second)
    );
    assert!(
        fx.store
            .run_object_url(RUN, name)
            .ends_with("/run-7/run/decisions.json"),
        "{}",
        fx.store.run_object_url(RUN, name)
    );
    // Run-level objects are no checkpoint: listing and pruning do not see them.
    assert!(fx.store.list(RUN).await.unwrap().is_empty());
    let e = fx
        .store
        .put_run_object(RUN, MANIFEST, first)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadObjectName { .. }), "{e}");
    assert!(fx
        .store
        .get_run_object("../x", name)
        .await
        .unwrap_err()
        .is_usage());
}

async fn prune_keeps_the_newest_and_cleans_leftovers(fx: Fixture) {
    for step in [100, 200, 300, 400, 500] {
        fx.save(RUN, step, step as u8).await;
    }
    // An abandoned save older than the newest commit, and one in flight after it.
    fx.store
        .put_object(RUN, 250, "student.safetensors", Bytes::from_static(b"old"))
        .await
        .unwrap();
    fx.store
        .put_object(RUN, 600, "student.safetensors", Bytes::from_static(b"new"))
        .await
        .unwrap();

    let e = fx.store.prune(RUN, 0).await.unwrap_err();
    assert!(e.is_usage(), "{e}");
    let pruned = fx.store.prune(RUN, 2).await.unwrap();
    assert_eq!(pruned.removed, [100, 200, 300]);
    assert_eq!(pruned.cleaned, [250]);
    let steps: Vec<u64> = fx
        .store
        .list(RUN)
        .await
        .unwrap()
        .iter()
        .map(|l| l.step)
        .collect();
    assert_eq!(steps, [500, 400]);
    for step in [400, 500] {
        assert!(fx.store.verify(RUN, step).await.unwrap().is_ok());
    }
    assert!(
        fx.store.get_object(RUN, 100, STUDENT).await.is_err(),
        "objects deleted too"
    );
    assert!(fx.store.get_object(RUN, 250, STUDENT).await.is_err());
    assert_eq!(
        fx.store.get_object(RUN, 600, STUDENT).await.unwrap(),
        Bytes::from_static(b"new")
    );
    assert_eq!(
        fx.store.prune(RUN, 2).await.unwrap(),
        Default::default(),
        "idempotent"
    );
}

async fn digest_depends_on_parameters_only(fx: Fixture) {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let with_meta = common::params(9, Some(meta));
    assert_ne!(with_meta, common::params(9, None), "the files differ");
    let e1 = fx
        .store
        .put_object("a", 1, STUDENT, Bytes::from(common::params(9, None)))
        .await
        .unwrap();
    let e2 = fx
        .store
        .put_object("b", 7, STUDENT, Bytes::from(with_meta))
        .await
        .unwrap();
    let e3 = fx
        .store
        .put_object("c", 1, STUDENT, Bytes::from(common::params(8, None)))
        .await
        .unwrap();
    fx.store.commit("a", 1, &[e1]).await.unwrap();
    fx.store.commit("b", 7, &[e2]).await.unwrap();
    fx.store.commit("c", 1, &[e3]).await.unwrap();
    let a = fx.store.digest("a", 1).await.unwrap();
    let b = fx.store.digest("b", 7).await.unwrap();
    let c = fx.store.digest("c", 1).await.unwrap();
    assert_eq!(a, b);
    assert_ne!(a.sha256, c.sha256);
    assert_eq!((a.tensors, a.bytes), (2, 4 * (24 + 8)));
}

async fn large_objects_go_up_in_parts(fx: Fixture) {
    // S3 parts are at least 5 MiB (s3s-fs enforces it), so 12 MiB makes three parts.
    let store = fx.reopen(StoreOptions {
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        ..common::options(Default::default())
    });
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let entry = store
        .put_object(RUN, 9, "optimizer.safetensors", Bytes::from(big.clone()))
        .await
        .unwrap();
    assert_eq!(entry.sha256, xkd_checkpoint::sha256_hex(&big));
    store.commit(RUN, 9, &[entry]).await.unwrap();
    assert!(store.verify(RUN, 9).await.unwrap().is_ok());
    assert_eq!(
        store
            .get_object(RUN, 9, "optimizer.safetensors")
            .await
            .unwrap()
            .len(),
        big.len()
    );
}

async fn files_stream_up_with_their_hash(fx: Fixture) {
    let store = fx.reopen(StoreOptions {
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        ..common::options(Default::default())
    });
    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (
        dir.path().join("state.json"),
        dir.path().join("optimizer.bin"),
    );
    std::fs::write(&small, b"{\"step\": 3}").unwrap();
    let data: Vec<u8> = (0..11u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(&big, &data).unwrap();
    let mut entries = Vec::new();
    for (name, file) in [("state.json", &small), ("optimizer.bin", &big)] {
        let e = store.put_file(RUN, 3, name, file).await.unwrap();
        assert_eq!(
            e.sha256,
            xkd_checkpoint::sha256_hex(&std::fs::read(file).unwrap())
        );
        entries.push(e);
    }
    assert_eq!(entries[1].size, data.len() as u64);
    store.commit(RUN, 3, &entries).await.unwrap();
    assert!(store.verify(RUN, 3).await.unwrap().is_ok());
    let e = store
        .put_file(RUN, 3, "x", &dir.path().join("absent"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("absent"), "{e}");
}

/// reqwest is built without a crypto provider of its own (the workspace's Cargo.toml), and
/// building an https client without one panics. The store installs ring: an https endpoint
/// gets a client, which opens with a TLS ClientHello, and a server that hangs up mid-handshake
/// is an error, not a panic.
#[tokio::test]
async fn an_https_store_speaks_tls_and_a_failed_handshake_is_an_error() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_byte = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut first = [0u8; 1];
        socket.read_exact(&mut first).await.unwrap();
        first[0]
    });
    let env = [
        ("AWS_ENDPOINT", format!("https://127.0.0.1:{port}")),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test-secret".into()),
    ];
    let options = StoreOptions {
        env: Env::Explicit(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        retry: Retry {
            max_retries: 0,
            ..common::test_retry()
        },
        ..StoreOptions::default()
    };
    let store = Store::open_with("s3://bucket/runs", options).expect("an https store opens");
    let listed = store.list(RUN).await;
    assert!(listed.is_err(), "a hung-up handshake listed {listed:?}");
    // 0x16: a TLS handshake record.
    assert_eq!(
        first_byte.await.unwrap(),
        0x16,
        "the client did not speak TLS"
    );
}

async fn prefixes_come_down_in_ranges(fx: Fixture) {
    // 1 MiB ranges, 3 at once: the 5 MiB + 3 byte object takes six ranges, the last short;
    // the small one and the empty one take one and none.
    let store = fx.reopen(StoreOptions {
        download_range: 1 << 20,
        download_concurrency: 3,
        ..common::options(Default::default())
    });
    let big: Vec<u8> = (0..(5u32 << 20) + 3)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let objects = [
        ("model.safetensors", big),
        ("config.json", b"{\"a\": 1}".to_vec()),
        ("empty.txt", Vec::new()),
    ];
    for (name, bytes) in &objects {
        store
            .put_object(RUN, 3, name, Bytes::from(bytes.clone()))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let names = store.download_prefix(dir.path()).await.unwrap();
    let step = format!("{RUN}/ckpt/0000000003");
    let mut want: Vec<String> = objects.iter().map(|(n, _)| format!("{step}/{n}")).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, bytes) in &objects {
        let got = std::fs::read(dir.path().join(&step).join(name)).unwrap();
        assert!(
            got == *bytes,
            "{name}: {} bytes, {} expected",
            got.len(),
            bytes.len()
        );
    }
}

async fn directories_go_up_and_resume(fx: Fixture) {
    // A directory up and down again, byte for byte; a second upload sends only the files
    // named last (and any whose size changed).
    let store = fx.reopen(common::options(Default::default()));
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(9u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
    let files = [
        ("clips/0/1/audio.wav", big),
        ("clips/0/1/01.jpg", b"jpeg".to_vec()),
        ("manifest.jsonl", b"{}\n".to_vec()),
    ];
    for (name, bytes) in &files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    assert_eq!(
        store
            .upload_prefix(dir.path(), &["manifest.jsonl"])
            .await
            .unwrap(),
        (3, 0)
    );
    assert_eq!(
        store
            .upload_prefix(dir.path(), &["manifest.jsonl"])
            .await
            .unwrap(),
        (1, 2)
    );
    let back = tempfile::tempdir().unwrap();
    let mut names = store.download_prefix(back.path()).await.unwrap();
    names.sort();
    assert_eq!(
        names,
        ["clips/0/1/01.jpg", "clips/0/1/audio.wav", "manifest.jsonl"]
    );
    for (name, bytes) in &files {
        assert!(
            std::fs::read(back.path().join(name)).unwrap() == *bytes,
            "{name}"
        );
    }
}
