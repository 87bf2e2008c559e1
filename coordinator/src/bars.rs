//! Progress a person can follow on a terminal: a bar per training stage (steps, rate, ETA) and
//! a spinner for the other stages, drawn by indicatif on stderr. Only on a terminal: when
//! stderr is a file or a pipe (Slurm, Kubernetes, tests), nothing is drawn and the log lines
//! carry the progress. Log lines on a terminal are printed above the bars (`LogWriter`), so
//! the bars never break them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

static TERMINAL: OnceLock<Option<MultiProgress>> = OnceLock::new();

/// Whether stderr is a terminal: bars are drawn and colour is used.
pub fn on_terminal() -> bool {
    terminal().is_some()
}

fn terminal() -> Option<&'static MultiProgress> {
    TERMINAL
        .get_or_init(|| {
            std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        })
        .as_ref()
}

/// Writes to stderr, above the bars when there are any (a `MakeWriter` for the log).
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match terminal() {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The progress of one stage's task; cleared when dropped.
pub struct Stage {
    bar: Option<ProgressBar>,
}

impl Stage {
    /// A bar from step `at` of `steps` (training), or a spinner (`steps` = `None`).
    pub fn start(name: &str, steps: Option<u64>, at: u64) -> Stage {
        Stage::counting(name, steps, at, "steps")
    }

    /// A bar from `at` of `total` things named `unit` ("clips"), or a spinner.
    pub fn counting(name: &str, total: Option<u64>, at: u64, unit: &'static str) -> Stage {
        let Some(bars) = terminal() else {
            return Stage { bar: None };
        };
        let bar = match total {
            Some(total) => {
                let bar = ProgressBar::new(total).with_position(at);
                bar.set_style(
                    ProgressStyle::with_template(&format!(
                        "{{prefix:>16}} [{{bar:32}}] {{pos}}/{{len}} {unit}  {{rate}}  eta {{eta}}"
                    ))
                    .expect("a valid template")
                    .with_key(
                        "rate",
                        move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.1} {unit}/s", s.per_sec());
                        },
                    )
                    .progress_chars("=> "),
                );
                bar.reset_eta();
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>16} {spinner} {elapsed}")
                        .expect("a valid template"),
                );
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            }
        };
        bar.set_prefix(name.to_string());
        Stage {
            bar: Some(bars.add(bar)),
        }
    }

    /// Steps taken so far.
    pub fn set(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let (Some(bar), Some(bars)) = (self.bar.take(), terminal()) {
            bar.finish_and_clear();
            bars.remove(&bar);
        }
    }
}
