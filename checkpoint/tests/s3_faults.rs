//! What only a networked store can do to us: go away for a while, or refuse our keys.

mod common;

use bytes::Bytes;
use common::Fixture;
use std::time::{Duration, Instant};
use xkd_checkpoint::{Env, Store, StoreOptions, STUDENT};

const RUN: &str = "run-outage";

/// The server dies in the middle of a save and comes back on the same port a few seconds
/// later (`XKD_S3_OUTAGE_SECS`, default 3; the 15 passes too): the puts in flight
/// retry with the production back-off and succeed, and the commit verifies.
#[tokio::test]
async fn a_save_survives_the_server_going_away() {
    let outage = std::env::var("XKD_S3_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut fx = Fixture::s3();
    let store = fx.reopen(StoreOptions::default());
    let objects = common::checkpoint_objects(4, 800);
    let (name, bytes) = objects[0].clone();
    let first = store.put_object(RUN, 800, name, bytes).await.unwrap();

    fx.server().stop();
    let saver = store.clone();
    let rest = objects[1..].to_vec();
    let in_flight = tokio::spawn(async move {
        let mut entries = Vec::new();
        for (name, bytes) in rest {
            entries.push(saver.put_object(RUN, 800, name, bytes).await?);
        }
        Ok::<_, xkd_checkpoint::Error>(entries)
    });
    let down_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(outage)).await;
    assert!(
        !in_flight.is_finished(),
        "puts cannot finish while the server is down"
    );
    fx.server().resume();

    let mut entries = in_flight
        .await
        .unwrap()
        .expect("puts retried until the server came back");
    assert!(down_since.elapsed() >= Duration::from_secs(outage));
    entries.insert(0, first);
    store.commit(RUN, 800, &entries).await.unwrap();
    let v = store.verify(RUN, 800).await.unwrap();
    assert!(v.is_ok(), "{}", v.problems());
    assert_eq!(store.list(RUN).await.unwrap().len(), 1);
}

/// With retries exhausted the error says which object failed; nothing is committed.
#[tokio::test]
async fn an_unreachable_store_fails_with_the_object_named() {
    let mut fx = Fixture::s3();
    let mut opts = common::options(Env::Explicit(fx.server().env()));
    opts.retry.max_retries = 2;
    opts.retry.retry_timeout = Duration::from_millis(300);
    let store = Store::open_with(&fx.store.url(), opts).unwrap();
    fx.server().stop();
    let e = store
        .put_object(RUN, 1, STUDENT, Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("0000000001/student.safetensors"),
        "{e}"
    );
    assert!(e.is_transient(), "{e:?}");
}

/// Wrong keys are refused, and no message carries the secret.
#[tokio::test]
async fn wrong_keys_are_refused_without_leaking_them() {
    let mut fx = Fixture::s3();
    let secret = "wrong-secret-do-not-print";
    let env: Vec<(String, String)> = fx
        .server()
        .env()
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_SECRET_ACCESS_KEY" {
                (k, secret.to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    let store = Store::open_with(&fx.store.url(), common::options(Env::Explicit(env))).unwrap();
    let e = store
        .put_object(RUN, 1, STUDENT, Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    let shown = format!("{e} {e:?} {store:?}");
    assert!(!shown.contains(secret), "{shown}");
    assert!(!shown.contains(fx.server().secret()), "{shown}");
    let opts = StoreOptions {
        env: Env::Explicit(vec![("AWS_SECRET_ACCESS_KEY".into(), secret.into())]),
        ..StoreOptions::default()
    };
    assert!(!format!("{opts:?}").contains(secret));
}

/// Bad URLs are refused before anything is contacted, and named.
#[tokio::test]
async fn bad_urls_are_named() {
    for url in [
        "s3://",
        "ftp://host/x",
        "s3://bucket/x?endpoint=http://evil",
    ] {
        let e = Store::open(url).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains(url), "{e}");
    }
    // A plain relative path is a local store under the current directory.
    let store = Store::open("some/relative/dir").unwrap();
    assert!(store.url().starts_with('/') && store.url().ends_with("some/relative/dir"));
}
