//! `xkd checkpoint ls|verify|digest URL`: read-only views of a checkpoint store, in plain text
//! for people or JSON (`--json`) for scripts. All store logic lives in `xkd-checkpoint`; this
//! file only formats.

use anyhow::{bail, Result};
use serde_json::json;
use std::time::Duration;
use xkd_checkpoint::{Listed, ObjectStatus, StoreOptions, Target, Verification};

/// `xkd checkpoint ls`: the run's committed checkpoints, newest first.
pub async fn ls(url: &str, as_json: bool) -> Result<()> {
    let target = Target::open(url, StoreOptions::default())?;
    let listed = target.store.list(&target.run_id).await?;
    if as_json {
        let rows: Vec<_> = listed.iter().map(ls_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if listed.is_empty() {
        eprintln!(
            "no committed checkpoint in run {} at {}",
            target.run_id,
            target.store.url()
        );
        return Ok(());
    }
    println!(
        "{:>10}  {:>10}  {:>8}  {:>7}  URL",
        "STEP", "SIZE", "AGE", "OBJECTS"
    );
    for l in &listed {
        match &l.manifest {
            Ok(m) => println!(
                "{:>10}  {:>10}  {:>8}  {:>7}  {}",
                l.step,
                size(m.total_size()),
                age(m.age()),
                m.objects.len(),
                l.url
            ),
            Err(bad) => println!(
                "{:>10}  unreadable manifest: {}  {}",
                l.step, bad.reason, l.url
            ),
        }
    }
    Ok(())
}

fn ls_json(l: &Listed) -> serde_json::Value {
    match &l.manifest {
        Ok(m) => json!({
            "step": l.step, "url": l.url, "size": m.total_size(), "objects": m.objects.len(),
            "created_unix_ms": m.created_unix_ms, "age_seconds": m.age().as_secs(),
        }),
        Err(bad) => json!({ "step": l.step, "url": l.url, "error": bad.reason }),
    }
}

/// `xkd checkpoint verify`: every object of one checkpoint (or, with `all`, of every committed
/// checkpoint of the run) against its manifest. Fails, naming each bad object, on mismatch.
pub async fn verify(url: &str, all: bool, as_json: bool) -> Result<()> {
    let target = Target::open(url, StoreOptions::default())?;
    let steps = if all && target.step.is_none() {
        let listed = target.store.list(&target.run_id).await?;
        if listed.is_empty() {
            target.step_or_newest().await?; // the "no committed checkpoint" error
        }
        listed.iter().map(|l| l.step).collect()
    } else {
        vec![target.step_or_newest().await?]
    };
    let mut bad = Vec::new();
    let mut reports = Vec::new();
    for step in steps {
        let v = match target.store.verify(&target.run_id, step).await {
            Ok(v) => v,
            Err(e @ xkd_checkpoint::Error::BadManifest(_)) => {
                bad.push(e.to_string());
                reports.push(json!({ "step": step, "ok": false, "error": e.to_string() }));
                if !as_json {
                    println!("BAD  {e}");
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !v.is_ok() {
            bad.push(format!("{} does not verify: {}", v.url, v.problems()));
        }
        if as_json {
            reports.push(verify_json(&v));
        } else {
            print_verification(&v);
        }
    }
    if as_json {
        let out = if all {
            json!(reports)
        } else {
            reports.remove(0)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if !bad.is_empty() {
        bail!("{}", bad.join("\n"));
    }
    Ok(())
}

fn print_verification(v: &Verification) {
    for o in &v.objects {
        let mark = if o.status == ObjectStatus::Ok {
            "ok "
        } else {
            "BAD"
        };
        println!("{mark}  {:<28} {:>10}  {}", o.name, size(o.size), o.status);
    }
    let n_bad = v.bad().count();
    if n_bad == 0 {
        println!(
            "{}: ok ({} objects, {})",
            v.url,
            v.objects.len(),
            size(v.manifest.total_size())
        );
    } else {
        println!("{}: {n_bad} of {} objects bad", v.url, v.objects.len());
    }
}

fn verify_json(v: &Verification) -> serde_json::Value {
    let objects: Vec<_> = v
        .objects
        .iter()
        .map(|o| {
            let status = match o.status {
                ObjectStatus::Ok => "ok",
                ObjectStatus::Missing => "missing",
                ObjectStatus::SizeMismatch { .. } => "size_mismatch",
                ObjectStatus::Sha256Mismatch { .. } => "sha256_mismatch",
            };
            json!({ "name": o.name, "size": o.size, "status": status, "detail": o.status.to_string() })
        })
        .collect();
    json!({ "url": v.url, "step": v.manifest.step, "ok": v.is_ok(), "objects": objects })
}

/// `xkd checkpoint digest`: one sha256 over the trainable parameters, `sha256sum`-style.
pub async fn digest(url: &str, as_json: bool) -> Result<()> {
    let target = Target::open(url, StoreOptions::default())?;
    let step = target.step_or_newest().await?;
    let d = target.store.digest(&target.run_id, step).await?;
    let ckpt = target.store.checkpoint_url(&target.run_id, step);
    if as_json {
        let out = json!({ "url": ckpt, "step": step, "sha256": d.sha256, "tensors": d.tensors, "bytes": d.bytes });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}  {ckpt}", d.sha256);
    }
    Ok(())
}

/// Bytes for people: `812 B`, `1.5 KiB`, `3.0 GiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut unit) = (bytes as f64, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Durations for people, two units at most: `42s`, `3m 12s`, `5h 2m`, `2d 7h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(size(812), "812 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(age(Duration::from_secs(42)), "42s");
        assert_eq!(age(Duration::from_secs(192)), "3m 12s");
        assert_eq!(age(Duration::from_secs(2 * 86400 + 7 * 3600)), "2d 7h");
    }
}
