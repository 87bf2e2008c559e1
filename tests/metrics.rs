//! The coordinator's metrics endpoint as a cluster's Prometheus meets it (issue 17): a real
//! `xkd run --metrics-listen 127.0.0.1:0`, scraped over HTTP with a real client all through
//! the run. Rank 0 is held twice (`XKD_TEST_HOLD`, after the checkpoints of steps 10 and 20),
//! so what the scrapes must show at each hold does not depend on the machine's speed.

mod common;

use common::{fresh_dir, held, release, run_args, serial, small_recipe, Background};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// One scrape: `series -> value`, the series as written (`name{labels}`).
#[derive(Debug, Clone)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("{l:?} is not `series value`"));
                let value = match value {
                    "NaN" => f64::NAN,
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("{l:?}: {v:?} is not a number")),
                };
                (series.to_string(), value)
            })
            .collect();
        Scrape(series)
    }

    fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// The value of `series`, which must be there.
    fn at(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no {series} in the scrape: {:#?}", self.0))
    }

    fn distill(&self, name: &str) -> Option<f64> {
        self.get(&format!("{name}{{stage=\"distill\"}}"))
    }

    fn checkpoint(&self) -> Option<f64> {
        self.get("xkd_checkpoint_step")
    }
}

/// Scrapes `url` with a blocking reqwest client, keeping every scrape.
struct Scraper {
    client: reqwest::blocking::Client,
    url: String,
    history: Vec<Scrape>,
}

impl Scraper {
    fn new(url: &str) -> Scraper {
        // reqwest is built without a TLS provider of its own and wants the process's, even
        // for plain http.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        Scraper {
            client,
            url: url.to_string(),
            history: Vec::new(),
        }
    }

    fn scrape(&mut self) -> Scrape {
        let response = self
            .client
            .get(&self.url)
            .send()
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.url));
        assert_eq!(response.status(), 200, "GET {}", self.url);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let scrape = Scrape::parse(&response.text().expect("a body"));
        self.history.push(scrape.clone());
        scrape
    }

    /// Scrapes until rank 0 is held after step `step` and the scrape shows that step's
    /// checkpoint committed (it commits while the rank waits; no later one can).
    fn at_hold(&mut self, run: &mut Background, out: &Path, step: u64) -> Scrape {
        run.wait_until(
            &format!("checkpoint {step} in a scrape while held"),
            LIMIT,
            || {
                let scrape = self.scrape();
                (held(out, step) && scrape.checkpoint() == Some(step as f64)).then_some(scrape)
            },
        )
    }
}

fn release_file(root: &Path, step: u64) -> PathBuf {
    let file = root.join(format!("release-{step}"));
    let _ = std::fs::remove_file(&file);
    file
}

/// What a scrape shows while rank 0 waits after the checkpoint of `step`.
fn check_held(scrape: &Scrape, step: u64) {
    let step = step as f64;
    assert_eq!(scrape.distill("xkd_step"), Some(step), "{scrape:#?}");
    assert_eq!(scrape.distill("xkd_stage"), Some(1.0), "{scrape:#?}");
    assert_eq!(
        scrape.distill("xkd_steps_planned"),
        Some(30.0),
        "{scrape:#?}"
    );
    assert_eq!(scrape.at("xkd_workers_alive"), 2.0, "{scrape:#?}");
    assert_eq!(scrape.at("xkd_workers_expected"), 2.0);
    for part in ["total", "kl", "ce"] {
        let loss = scrape.at(&format!("xkd_loss{{stage=\"distill\",part=\"{part}\"}}"));
        assert!(loss.is_finite() && loss >= 0.0, "{part} loss {loss}");
    }
    assert!(scrape.distill("xkd_learning_rate").unwrap() > 0.0);
    assert!(scrape.distill("xkd_samples_per_second").unwrap() > 0.0);
    let age = scrape.at("xkd_checkpoint_age_seconds");
    assert!((0.0..LIMIT.as_secs_f64()).contains(&age), "age {age}");
    assert_eq!(scrape.at("xkd_restarts_total{kind=\"failure\"}"), 0.0);
    assert_eq!(scrape.at("xkd_restarts_total{kind=\"preemption\"}"), 0.0);
    // Stages the run has left are 0.
    assert_eq!(scrape.get("xkd_stage{stage=\"eval_before\"}"), Some(0.0));
}

#[test]
fn a_run_serves_metrics_that_move_while_it_trains() {
    let _serial = serial();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("metrics");
    let out = fresh_dir(&root, "scraped");
    std::fs::create_dir_all(&root).unwrap();
    let mut sets = small_recipe(&root.join("cache"), "scraped", 30, 10, 3);
    sets.push("log.every=5".into());
    let (release_10, release_20) = (release_file(&root, 10), release_file(&root, 20));
    let hold = format!("10:{};20:{}", release_10.display(), release_20.display());
    let env = [("XKD_TEST_HOLD".to_string(), hold)];
    let args = run_args(&out, &sets, &["--metrics-listen", "127.0.0.1:0"]);
    let mut run = Background::start(&args, &env, &root.join("scraped.log"));

    let listening = run.wait_for("the metrics address", LIMIT, |r| {
        r["message"] == "metrics listening"
    });
    let url = listening["url"].as_str().expect("a url").to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{listening}");
    assert!(
        !url.ends_with(":0/metrics"),
        "the bound port is logged: {url}"
    );
    let mut scraper = Scraper::new(&url);

    // Bound before any worker starts: nothing trained, nothing committed yet.
    let first = scraper.scrape();
    assert_eq!(first.at("xkd_run_info{run_id=\"scraped\"}"), 1.0);
    assert_eq!(first.at("xkd_workers_expected"), 2.0);
    assert!(first.checkpoint().is_none(), "{first:#?}");
    assert!(first.distill("xkd_step").is_none(), "{first:#?}");

    let at_10 = scraper.at_hold(&mut run, &out, 10);
    check_held(&at_10, 10);
    assert_eq!(at_10.at("xkd_checkpoints_committed_total"), 1.0);
    release(&release_10);

    let at_20 = scraper.at_hold(&mut run, &out, 20);
    check_held(&at_20, 20);
    assert_eq!(at_20.at("xkd_checkpoints_committed_total"), 2.0);
    release(&release_20);

    // Scraped on while the run finishes, until the endpoint goes with the coordinator.
    let start = std::time::Instant::now();
    while run.child.try_wait().expect("try_wait").is_none() && start.elapsed() < LIMIT {
        if let Ok(text) = scraper
            .client
            .get(&scraper.url)
            .send()
            .and_then(|r| r.text())
        {
            scraper.history.push(Scrape::parse(&text));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, log) = run.wait(LIMIT);
    assert_eq!(code, 0, "{log}");

    // Over every scrape: the step and the checkpoint never went back, the workers alive
    // never exceeded the world, and the loss was always finite.
    let history = &scraper.history;
    assert!(history.len() >= 3, "{} scrapes", history.len());
    let series =
        |f: &dyn Fn(&Scrape) -> Option<f64>| -> Vec<f64> { history.iter().filter_map(f).collect() };
    let steps = series(&|s| s.distill("xkd_step"));
    let checkpoints = series(&|s| s.checkpoint());
    for (name, values) in [("step", &steps), ("checkpoint step", &checkpoints)] {
        assert!(
            values.windows(2).all(|w| w[0] <= w[1]),
            "the {name} went back: {values:?}"
        );
    }
    assert!(steps.contains(&10.0) && steps.contains(&20.0), "{steps:?}");
    assert!(history.iter().all(|s| s.at("xkd_workers_alive") <= 2.0));
    let losses = series(&|s| s.get("xkd_loss{stage=\"distill\",part=\"total\"}"));
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(out.join("report.json").is_file());
}
