//! Data parallelism and determinism, through the same `Rank::train` the workers run, with real
//! files on disk and a real TCP ring between threads.

use std::path::{Path, PathBuf};
use std::time::Duration;
use xkd_collective::{Collective, RingKey, RingListener, Solo};
use xkd_config::{Config, Modality};
use xkd_data as data;
use xkd_protocol::{Objective, ShardPlan, TrainTask};
use xkd_worker::train::{load_params, Rank};

fn small_config(dir: &Path) -> Config {
    let mut c = Config::embedded();
    c.data.pretrain_clips = 4;
    c.data.pretrain_scarce_clips = 1;
    c.data.probe_clips = 1;
    c.data.distill_clips = 2;
    c.data.eval_clips = 1;
    c.data.dir = dir.join("data").display().to_string();
    // Buckets of 8 KiB (2048 gradients): the tiny models' gradients then cross the ring in
    // dozens of buckets, with parameters larger than a bucket alone in theirs.
    c.collective.bucket_mb = 8.0 / 1024.0;
    c
}

fn rank(config: &Config, r: u32, world: u32, collective: Box<dyn Collective>) -> Rank {
    let mut rank = Rank::new(config.clone(), r, world, collective).unwrap();
    let dir = PathBuf::from(&config.data.dir);
    rank.manifest = Some(std::sync::Arc::new(
        data::ensure_dataset(&config.data, &dir).unwrap(),
    ));
    rank
}

fn task(config: &Config, modality: Modality, batch: usize, save: &Path) -> TrainTask {
    let manifest = data::ensure_dataset(&config.data, Path::new(&config.data.dir)).unwrap();
    let clips = manifest
        .clips
        .iter()
        .filter(|c| c.split == "pretrain")
        .map(|c| c.id)
        .collect();
    TrainTask {
        modality,
        objective: Objective::Supervised,
        init: None,
        save: save.display().to_string(),
        keep_saved: false,
        plan: ShardPlan::shuffled(clips, 3),
        replay: None,
        steps: 5,
        batch,
        replay_batch: 0,
        // Adam scales every coordinate's step to about lr, so coordinates whose true gradient
        // is zero by symmetry (key weights along the mean-key direction: softmax ignores a
        // per-query shift) turn summation-order rounding into steps of up to lr. At lr 3e-3
        // that reaches 1.6e-5 after 5 steps; at 1e-3 the equivalence holds within 1e-5.
        lr: 1e-3,
        weight_decay: 0.01,
        warmup_steps: 2,
        caption_weight: 1.0,
        grad_clip: 1.0,
        seed: 11,
        checkpoint: None,
        resume_from: None,
        teacher_cache: None,
    }
}

/// Train with `world` ranks on threads, connected by a TCP ring on loopback.
fn train_world(config: &Config, modality: Modality, world: u32, batch: usize, save: &Path) {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    std::thread::scope(|s| {
        for (r, listener) in listeners.into_iter().enumerate() {
            let peers = peers.clone();
            let t = task(config, modality, batch, save);
            s.spawn(move || {
                let ring = listener
                    .connect(
                        r,
                        &peers,
                        Duration::from_secs(20),
                        &RingKey::from_token("t"),
                    )
                    .unwrap();
                let mut rank = rank(config, r as u32, world, Box::new(ring));
                rank.train(1, &t, |_| {}).unwrap();
            });
        }
    });
}

/// Largest absolute difference between two saved models, and the parameter where it is.
fn max_abs_diff(a: &Path, b: &Path) -> (f32, String) {
    let (pa, pb) = (load_params(a).unwrap(), load_params(b).unwrap());
    assert_eq!(pa.len(), pb.len());
    let mut worst = (0.0f32, String::new());
    for ((na, va), (nb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            if (x - y).abs() > worst.0 {
                worst = ((x - y).abs(), na.clone());
            }
        }
    }
    worst
}

#[test]
fn two_workers_of_b_match_one_worker_of_2b() {
    let tmp = tempfile::tempdir().unwrap();
    let config = small_config(tmp.path());
    for modality in [Modality::Audio, Modality::Visual] {
        let one = tmp.path().join(format!("{modality:?}-one.safetensors"));
        let two = tmp.path().join(format!("{modality:?}-two.safetensors"));
        train_world(&config, modality, 1, 8, &one);
        train_world(&config, modality, 2, 4, &two);
        let (diff, at) = max_abs_diff(&one, &two);
        eprintln!("{modality:?}: 1 x 8 vs 2 x 4 after 5 steps: max abs diff {diff:e} in {at}");
        assert!(diff <= 1e-5, "{modality:?}: max abs diff {diff} in {at}");
        // And training did move the parameters: a fresh init differs from both.
        let fresh = tmp.path().join("fresh.safetensors");
        let mut t = task(&config, modality, 8, &fresh);
        t.steps = 0;
        rank(&config, 0, 1, Box::new(Solo))
            .train(1, &t, |_| {})
            .unwrap();
        assert!(
            max_abs_diff(&one, &fresh).0 > 1e-4,
            "{modality:?}: training changed nothing"
        );
    }
}

#[test]
fn same_seed_gives_byte_identical_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let config = small_config(tmp.path());
    let a = tmp.path().join("a.safetensors");
    let b = tmp.path().join("b.safetensors");
    let c = tmp.path().join("c.safetensors");
    train_world(&config, Modality::Audio, 2, 4, &a);
    train_world(&config, Modality::Audio, 2, 4, &b);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let mut other = config.clone();
    other.run.seed += 1;
    let mut t = task(&other, Modality::Audio, 8, &c);
    t.seed += 1;
    rank(&other, 0, 1, Box::new(Solo))
        .train(1, &t, |_| {})
        .unwrap();
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

/// The loader only moves work between threads: one loader thread and a cache that keeps every
/// clip, or four threads and no cache beyond the steps in flight (so clips are made again each
/// epoch), train the same bytes.
#[test]
fn loader_threads_and_the_cache_budget_change_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let config = small_config(tmp.path());
    let mut sync = config.clone();
    sync.run.loader_threads = 1;
    sync.run.feature_cache_mb = 2048;
    let mut ahead = config.clone();
    ahead.run.loader_threads = 4;
    ahead.run.feature_cache_mb = 0;
    for modality in [Modality::Audio, Modality::Visual] {
        let a = tmp.path().join(format!("{modality:?}-sync.safetensors"));
        let b = tmp.path().join(format!("{modality:?}-ahead.safetensors"));
        train_world(&sync, modality, 2, 4, &a);
        train_world(&ahead, modality, 2, 4, &b);
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{modality:?}"
        );
    }
}
