//! A pause point for tests that act on a run between two checkpoints.
//!
//! `XKD_TEST_HOLD=STEP:FILE` makes rank 0 of a checkpointed training task, once step STEP is
//! taken and its checkpoint uploaded (the `Saved` message handed to the control link), wait
//! until FILE exists or the rank is asked to stop. While it waits no later step can be taken
//! by any rank (they wait for it in the next all-reduce), so no later checkpoint can commit:
//! a test that kills or stops something then acts at a known point, on any machine speed.
//! Heartbeats come from the control link's own tasks and go on. Nothing but tests sets it;
//! unset, this module does nothing.

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
    /// The hold `XKD_TEST_HOLD` asks for, if set; an error names a malformed value.
    pub fn from_env() -> Result<Option<Hold>> {
        match std::env::var(VAR) {
            Ok(value) => Hold::parse(&value).map(Some),
            Err(_) => Ok(None),
        }
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
    fn a_stop_releases_a_hold() {
        let hold = Hold {
            step: 1,
            release: PathBuf::from("/nonexistent/xkd-hold"),
        };
        hold.wait(0, &AtomicBool::new(true));
    }
}
