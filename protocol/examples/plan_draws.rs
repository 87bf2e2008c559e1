//! How long drawing from a large `ShardPlan` takes: 10^5 samples from a 2*10^5-clip plan in
//! batches of 64, through the cached per-epoch order, against the cost of one Fisher-Yates
//! (what every draw paid before the order was cached).
//!
//! `cargo run --release -p xkd-protocol --example plan_draws`

use std::time::Instant;
use xkd_protocol::{permutation, ShardPlan};

fn main() {
    let (clips, draws, batch) = (200_000u32, 100_000u64, 64usize);
    let plan = ShardPlan::shuffled((0..clips).collect(), 7);
    let start = Instant::now();
    let mut checksum = 0u64;
    for step in 0..draws / batch as u64 {
        for s in plan.samples(0, 1, step, batch) {
            checksum = checksum.wrapping_add(s.clip as u64);
        }
    }
    let cached = start.elapsed();
    let rebuilds = 20;
    let start = Instant::now();
    for epoch in 0..rebuilds {
        checksum = checksum.wrapping_add(permutation(clips as usize, 7, epoch)[0] as u64);
    }
    let one_build = start.elapsed() / rebuilds as u32;
    let drawn = draws - draws % batch as u64;
    println!(
        "{drawn} draws from a {clips}-clip plan: {cached:?} ({:?} per draw)",
        cached / drawn as u32
    );
    println!(
        "one permutation of {clips}: {one_build:?}; rebuilt per draw that would be {:?}",
        one_build * drawn as u32
    );
    println!("(checksum {checksum})");
}
