//! A pause point for tests that act on a run between two checkpoints.
//!
//! `XKD_TEST_HOLD=STEP:FILE` makes rank 0 of a checkpointed training task, once step STEP is
//! taken and its checkpoint uploaded (the `Saved` message handed to the control link), wait
//! until FILE exists or the rank is asked to stop. `STEP:FILE;STEP:FILE...` holds at each of
//! the steps, each released by its own file (a test that looks at a run twice). While it waits no later step can be taken
//! by any rank (they wait for it in the next all-reduce), so no later checkpoint can commit:
//! a test that kills or stops something then acts at a known point, on any machine speed.
//! Heartbeats come from the control link's own tasks and go on. Nothing but tests sets it;
//! unset, this module does nothing.
//!
//! Two more hooks act on every rank of a checkpointed training task (distillation), for the
//! liveness tests:
//! - `XKD_TEST_SETUP_DELAY=RANK:MS`: rank RANK sleeps MS milliseconds after loading its models,
//!   before the barrier that ends setup (a slow model load);
//! - `XKD_TEST_STALL=RANK:STEP:FILE`: once step STEP is taken, rank RANK creates FILE and then
//!   sleeps for ever without reporting progress (a read hung on a dead filesystem). It does so
//!   only while FILE does not exist, so the generation that replaces it trains on.

use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const VAR: &str = "XKD_TEST_HOLD";

/// Where rank 0 waits, and the file whose creation releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub step: u64,
    pub release: PathBuf,
}

impl Hold {
    /// The holds `XKD_TEST_HOLD` asks for (none when unset); an error names a malformed
    /// value.
    pub fn from_env() -> Result<Vec<Hold>> {
        match std::env::var(VAR) {
            Ok(value) => Hold::parse_all(&value),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// `STEP:FILE`, or several separated by `;`.
    fn parse_all(value: &str) -> Result<Vec<Hold>> {
        value
            .split(';')
            .map(|one| Hold::parse(one).with_context(|| format!("{VAR}={value:?}")))
            .collect()
    }

    fn parse(value: &str) -> Result<Hold> {
        let (step, file) = value
            .split_once(':')
            .with_context(|| format!("{VAR}={value:?}: expected STEP:FILE"))?;
        let step = step
            .parse()
            .with_context(|| format!("{VAR}={value:?}: {step:?} is not a step"))?;
        Ok(Hold {
            step,
            release: PathBuf::from(file),
        })
    }

    /// Waits (logging that it does) until the release file exists or `stop` is set.
    pub fn wait(&self, rank: u32, stop: &AtomicBool) {
        tracing::info!(rank, step = self.step, release = %self.release.display(), "held for a test");
        while !self.release.exists() && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(rank, step = self.step, "released");
    }
}

pub const DELAY_VAR: &str = "XKD_TEST_SETUP_DELAY";
pub const STALL_VAR: &str = "XKD_TEST_STALL";

/// The setup delay and the stall asked of this rank, if any.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Faults {
    pub setup_delay: Option<Duration>,
    pub stall: Option<(u64, PathBuf)>,
}

impl Faults {
    pub fn from_env(rank: u32) -> Result<Faults> {
        let var = |name| std::env::var(name).ok();
        Faults::parse(rank, var(DELAY_VAR).as_deref(), var(STALL_VAR).as_deref())
    }

    fn parse(rank: u32, delay: Option<&str>, stall: Option<&str>) -> Result<Faults> {
        let mine = |name: &str, value: &str| -> Result<Option<String>> {
            let (r, rest) = value
                .split_once(':')
                .with_context(|| format!("{name}={value:?}: expected RANK:..."))?;
            let r: u32 = r
                .parse()
                .with_context(|| format!("{name}={value:?}: {r:?} is not a rank"))?;
            Ok((r == rank).then(|| rest.to_string()))
        };
        let mut faults = Faults::default();
        if let Some(value) = delay {
            if let Some(ms) = mine(DELAY_VAR, value)? {
                let ms: u64 = ms.parse().with_context(|| {
                    format!("{DELAY_VAR}={value:?}: {ms:?} is not milliseconds")
                })?;
                faults.setup_delay = Some(Duration::from_millis(ms));
            }
        }
        if let Some(value) = stall {
            if let Some(rest) = mine(STALL_VAR, value)? {
                let hold = Hold::parse(&rest)
                    .with_context(|| format!("{STALL_VAR}={value:?}: expected RANK:STEP:FILE"))?;
                faults.stall = Some((hold.step, hold.release));
            }
        }
        Ok(faults)
    }

    /// Sleeps for the setup delay, if one is asked.
    pub fn delay_setup(&self, rank: u32) {
        if let Some(delay) = self.setup_delay {
            tracing::info!(
                rank,
                ms = delay.as_millis() as u64,
                "setup delayed for a test"
            );
            std::thread::sleep(delay);
        }
    }

    /// Stalls for ever once `step` is taken, if asked and its file does not exist yet.
    pub fn stall_after(&self, rank: u32, step: u64) -> Result<()> {
        let Some((at, file)) = self.stall.as_ref().filter(|(at, _)| *at == step) else {
            return Ok(());
        };
        if file.exists() {
            return Ok(());
        }
        std::fs::write(file, b"").with_context(|| format!("creating {}", file.display()))?;
        tracing::warn!(rank, step = at, "stalled for a test");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_is_a_step_and_a_file_and_a_bad_one_is_named() {
        let hold = Hold::parse("20:/tmp/x:y").unwrap();
        assert_eq!(hold.step, 20);
        assert_eq!(hold.release, PathBuf::from("/tmp/x:y"));
        let err = format!("{:#}", Hold::parse("twenty:/tmp/x").unwrap_err());
        assert!(err.contains("\"twenty\" is not a step"), "{err}");
        assert!(Hold::parse("20").is_err());
    }

    #[test]
    fn faults_apply_to_the_rank_they_name() {
        let both = Faults::parse(1, Some("1:250"), Some("1:30:/tmp/s")).unwrap();
        assert_eq!(both.setup_delay, Some(Duration::from_millis(250)));
        assert_eq!(both.stall, Some((30, PathBuf::from("/tmp/s"))));
        let other = Faults::parse(0, Some("1:250"), Some("1:30:/tmp/s")).unwrap();
        assert_eq!(other, Faults::default());
        let err = format!("{:#}", Faults::parse(0, Some("0:soon"), None).unwrap_err());
        assert!(err.contains("\"soon\" is not milliseconds"), "{err}");
        assert!(Faults::parse(0, None, Some("0:30")).is_err());
    }

    #[test]
    fn several_holds_are_separated_by_semicolons() {
        let holds = Hold::parse_all("10:/tmp/a;20:/tmp/b:c").unwrap();
        assert_eq!(
            holds,
            [
                Hold {
                    step: 10,
                    release: PathBuf::from("/tmp/a"),
                },
                Hold {
                    step: 20,
                    release: PathBuf::from("/tmp/b:c"),
                },
            ]
        );
        assert_eq!(Hold::parse_all("5:/tmp/x").unwrap().len(), 1);
        let err = format!("{:#}", Hold::parse_all("10:/tmp/a;x:/tmp/b").unwrap_err());
        assert!(err.contains("\"x\" is not a step"), "{err}");
        assert!(Hold::parse_all("10:/tmp/a;").is_err());
    }

    #[test]
    fn a_stop_releases_a_hold() {
        let hold = Hold {
            step: 1,
            release: PathBuf::from("/nonexistent/xkd-hold"),
        };
        hold.wait(0, &AtomicBool::new(true));
    }
}
