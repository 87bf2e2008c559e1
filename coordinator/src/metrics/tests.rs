use super::*;
use std::collections::BTreeMap;

/// `series -> value` of a scrape: `name{labels}` as written, comments left out.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            let value = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("{l:?}: not a number")),
            };
            (series.to_string(), value)
        })
        .collect()
}

fn report(rank: u32, step: u64, loss: f64) -> StepReport {
    StepReport {
        task: 1,
        rank,
        step,
        loss,
        kl: loss / 2.0,
        ce: loss / 4.0,
        lr: 1e-3,
        grad_norm: 0.5,
        samples_per_s: 640.0,
        tokens_per_s: 1.0,
        ms_teacher: 0.0,
        ms_student: 0.0,
        ms_loss: 0.0,
        ms_allreduce: 0.0,
        ms_optimizer: 0.0,
    }
}

#[test]
fn a_fresh_registry_has_its_fixed_series_and_no_checkpoint() {
    let text = Metrics::new("run-1", 2).encode();
    let got = parse(&text);
    assert_eq!(got["xkd_run_info{run_id=\"run-1\"}"], 1.0, "{text}");
    assert_eq!(got["xkd_workers_expected"], 2.0, "{text}");
    assert_eq!(got["xkd_workers_alive"], 0.0, "{text}");
    assert_eq!(got["xkd_restarts_total{kind=\"failure\"}"], 0.0, "{text}");
    assert_eq!(
        got["xkd_restarts_total{kind=\"preemption\"}"], 0.0,
        "{text}"
    );
    assert_eq!(got["xkd_checkpoints_committed_total"], 0.0, "{text}");
    assert!(!text.contains("xkd_checkpoint_step"), "{text}");
    assert!(!text.contains("xkd_checkpoint_age_seconds"), "{text}");
    assert!(
        text.contains("# TYPE xkd_restarts_total counter\n"),
        "{text}"
    );
    // A family with no series yet is not written at all.
    assert!(!text.contains("xkd_loss"), "{text}");
}

#[test]
fn rank_0s_step_reports_set_the_series_of_their_stage() {
    let metrics = Metrics::new("r", 2);
    metrics.enter_stage("distill");
    metrics.plan_steps("distill", 30);
    metrics.step("distill", &report(0, 10, 2.0));
    metrics.step("distill", &report(1, 10, 9.0));
    let text = metrics.encode();
    assert!(text.contains("# TYPE xkd_loss gauge\n"), "{text}");
    let got = parse(&text);
    assert_eq!(got["xkd_stage{stage=\"distill\"}"], 1.0);
    assert_eq!(got["xkd_steps_planned{stage=\"distill\"}"], 30.0);
    assert_eq!(got["xkd_step{stage=\"distill\"}"], 10.0);
    assert_eq!(
        got["xkd_loss{stage=\"distill\",part=\"total\"}"], 2.0,
        "rank 1 ignored"
    );
    assert_eq!(got["xkd_loss{stage=\"distill\",part=\"kl\"}"], 1.0);
    assert_eq!(got["xkd_loss{stage=\"distill\",part=\"ce\"}"], 0.5);
    assert_eq!(got["xkd_learning_rate{stage=\"distill\"}"], 1e-3);
    assert_eq!(got["xkd_samples_per_second{stage=\"distill\"}"], 640.0);
    assert_eq!(got["xkd_grad_norm{stage=\"distill\"}"], 0.5);
}

#[test]
fn entering_a_stage_clears_the_one_left() {
    let metrics = Metrics::new("r", 1);
    metrics.enter_stage("probe");
    metrics.enter_stage("probe");
    metrics.enter_stage("distill");
    let got = parse(&metrics.encode());
    assert_eq!(got["xkd_stage{stage=\"probe\"}"], 0.0);
    assert_eq!(got["xkd_stage{stage=\"distill\"}"], 1.0);
}

#[test]
fn restarts_are_counted_by_kind() {
    let metrics = Metrics::new("r", 1);
    metrics.restarted(RestartKind::Failure);
    metrics.restarted(RestartKind::Failure);
    metrics.restarted(RestartKind::Preemption);
    let got = parse(&metrics.encode());
    assert_eq!(got["xkd_restarts_total{kind=\"failure\"}"], 2.0);
    assert_eq!(got["xkd_restarts_total{kind=\"preemption\"}"], 1.0);
}

#[test]
fn a_committed_checkpoint_appears_with_its_age() {
    let metrics = Metrics::new("r", 1);
    metrics.committed(10);
    metrics
        .m
        .last_checkpoint
        .set(20, Instant::now() - Duration::from_secs(5));
    let got = parse(&metrics.encode());
    assert_eq!(got["xkd_checkpoint_step"], 20.0);
    let age = got["xkd_checkpoint_age_seconds"];
    assert!((5.0..60.0).contains(&age), "age {age}");
    assert_eq!(got["xkd_checkpoints_committed_total"], 1.0);
}

#[test]
fn workers_alive_is_a_gauge_the_server_keeps() {
    let metrics = Metrics::new("r", 2);
    let alive = metrics.workers_alive();
    alive.inc();
    alive.inc();
    alive.dec();
    assert_eq!(parse(&metrics.encode())["xkd_workers_alive"], 1.0);
}

/// The registry is bounded: a long run has the series a short one has, whatever its steps.
#[test]
fn the_series_do_not_grow_with_steps() {
    let metrics = Metrics::new("r", 2);
    let feed = |from: u64, to: u64| {
        for step in from..to {
            for stage in ["pretrain_audio", "distill"] {
                metrics.enter_stage(stage);
                metrics.plan_steps(stage, to);
                metrics.step(stage, &report((step % 2) as u32, step, 1.0 / step as f64));
            }
            metrics.committed(step);
        }
    };
    feed(1, 3);
    let few: Vec<String> = parse(&metrics.encode()).into_keys().collect();
    feed(3, 20_000);
    let text = metrics.encode();
    let many: Vec<String> = parse(&text).into_keys().collect();
    assert_eq!(few, many);
    assert!(text.len() < 4096, "{} bytes:\n{text}", text.len());
}

/// An HTTP client (reqwest takes the process's rustls provider, even for plain http).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn get(url: &str) -> reqwest::Response {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

#[tokio::test]
async fn the_endpoint_serves_the_text_format_at_metrics_only() {
    let metrics = Metrics::new("served", 3);
    let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone())
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr());
    let ok = get(&format!("{base}/metrics")).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let got = parse(&ok.text().await.unwrap());
    assert_eq!(got["xkd_workers_expected"], 3.0);
    // A value fed after the first scrape is in the next.
    metrics.committed(7);
    let again = parse(&get(&format!("{base}/metrics")).await.text().await.unwrap());
    assert_eq!(again["xkd_checkpoint_step"], 7.0);
    assert_eq!(get(&format!("{base}/")).await.status(), 404);
    assert_eq!(get(&format!("{base}/metrics/x")).await.status(), 404);
    let post = client()
        .post(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    // Dropped, it stops serving.
    let addr = server.local_addr();
    drop(server);
    tokio::task::yield_now().await;
    let gone = client()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(gone.is_err(), "still served after drop: {gone:?}");
}

#[tokio::test]
async fn a_taken_port_fails_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = MetricsServer::start(addr, Metrics::new("r", 1))
        .await
        .err()
        .expect("a taken port is refused");
    let text = format!("{err:#}");
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("--metrics-listen"), "{text}");
}

/// A client that connects and sends nothing holds a slot for at most `CONNECTION_LIMIT`, and
/// never the others' scrapes.
#[tokio::test]
async fn silent_connections_do_not_stop_scrapes() {
    let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), Metrics::new("r", 1))
        .await
        .unwrap();
    let addr = server.local_addr();
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS / 2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let scrape = tokio::time::timeout(
        Duration::from_secs(5),
        get(&format!("http://{addr}/metrics")),
    )
    .await
    .expect("a scrape beside silent connections answers at once");
    assert_eq!(scrape.status(), 200);
}
