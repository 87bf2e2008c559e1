//! What a cluster's Prometheus scrapes from the coordinator (`--metrics-listen ADDR`,
//! `control.metrics_listen`): the registry the run feeds as it learns things, and the HTTP
//! endpoint that serves it as the Prometheus text format at `/metrics`.
//!
//! Where the values come from: the stage and rank 0's `StepReport`s from the driver's event
//! loop (`Driver::order_and_wait`, `Driver::log_step` beside `metrics.jsonl`), restarts from
//! `Driver::recover`, commits from `Checkpoints::commit` (on the background commit task),
//! workers alive from each joined worker's watcher (`ControlServer::count_alive`). Nothing
//! here is on the wire: the workers already send all of it.
//!
//! Two promises. The endpoint never blocks training: feeding the registry is an atomic store
//! (or a short read lock the first time a label set is seen), a scrape encodes under those
//! same short locks on its own task, and the driver never waits for a scrape. The registry is
//! bounded: label values are stages, loss parts and restart kinds, fixed sets the code
//! names, never a step, a rank or a class, so its memory does not grow with the run.

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use xkd_protocol::StepReport;

/// Scrapes served at once; a connection over this is closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Everything one connection may take (request and response): a client that sends its
/// request slowly, or never, is dropped after this.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    stage: String,
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabel {
    run_id: String,
}

/// Why the workers were restarted, as `xkd_restarts_total{kind}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// A worker was lost, stalled or failed transiently (counted in `control.max_restarts`).
    Failure,
    /// A worker left in order after its own SIGTERM (not counted in the budget).
    Preemption,
}

impl RestartKind {
    fn label(self) -> &'static str {
        match self {
            RestartKind::Failure => "failure",
            RestartKind::Preemption => "preemption",
        }
    }
}

/// The run's metrics; cheap to clone, every clone feeds the same registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    m: Arc<Inner>,
}

/// The metrics the run feeds, each also registered (the registry holds clones: a metric is
/// a handle on shared atomics).
struct Inner {
    stage: Family<StageLabel, Gauge>,
    current_stage: Mutex<Option<String>>,
    steps_planned: Family<StageLabel, Gauge>,
    step: Family<StageLabel, Gauge>,
    loss: Family<LossLabels, FloatGauge>,
    learning_rate: Family<StageLabel, FloatGauge>,
    samples_per_second: Family<StageLabel, FloatGauge>,
    grad_norm: Family<StageLabel, FloatGauge>,
    restarts: Family<KindLabel, Counter>,
    workers_alive: Gauge,
    workers_expected: Gauge,
    checkpoints_committed: Counter,
    last_checkpoint: Arc<LastCheckpoint>,
}

impl Metrics {
    /// A registry for the run `run_id` with `world` workers expected; every metric with a
    /// fixed set of series is there from the start (restarts at 0, workers alive at 0).
    pub fn new(run_id: &str, world: usize) -> Metrics {
        let mut registry = Registry::with_prefix("xkd");
        let inner = Inner {
            stage: Family::default(),
            current_stage: Mutex::new(None),
            steps_planned: Family::default(),
            step: Family::default(),
            loss: Family::default(),
            learning_rate: Family::default(),
            samples_per_second: Family::default(),
            grad_norm: Family::default(),
            restarts: Family::default(),
            workers_alive: Gauge::default(),
            workers_expected: Gauge::default(),
            checkpoints_committed: Counter::default(),
            last_checkpoint: Arc::new(LastCheckpoint::default()),
        };
        let run = RunLabel {
            run_id: run_id.to_string(),
        };
        registry.register("run", "The run this coordinator drives", Info::new(run));
        registry.register(
            "stage",
            "1 for the stage the run is in, 0 for the stages it has left",
            inner.stage.clone(),
        );
        registry.register(
            "steps_planned",
            "Optimizer steps the stage's training task takes in all",
            inner.steps_planned.clone(),
        );
        registry.register(
            "step",
            "Optimizer steps rank 0 has reported in the stage (every log.every steps)",
            inner.step.clone(),
        );
        registry.register(
            "loss",
            "Rank 0's loss at its last reported step, by part (total, kl, ce)",
            inner.loss.clone(),
        );
        registry.register(
            "learning_rate",
            "Learning rate of the last reported step",
            inner.learning_rate.clone(),
        );
        registry.register(
            "samples_per_second",
            "Training samples per second over all ranks, at the last reported step",
            inner.samples_per_second.clone(),
        );
        registry.register(
            "grad_norm",
            "Gradient norm over all ranks before clipping, at the last reported step",
            inner.grad_norm.clone(),
        );
        registry.register(
            "restarts",
            "Times the workers were restarted, by kind (failure: counted in \
             control.max_restarts; preemption: a worker left after its own SIGTERM)",
            inner.restarts.clone(),
        );
        registry.register(
            "workers_alive",
            "Workers of the current generation whose connection is up",
            inner.workers_alive.clone(),
        );
        registry.register(
            "workers_expected",
            "Workers the run trains with (control.workers, or xkd run --workers)",
            inner.workers_expected.clone(),
        );
        registry.register(
            "checkpoints_committed",
            "Checkpoints this coordinator committed",
            inner.checkpoints_committed.clone(),
        );
        registry.register_collector(Box::new(inner.last_checkpoint.clone()));
        inner
            .workers_expected
            .set(i64::try_from(world).unwrap_or(i64::MAX));
        // Both kinds exist at 0 from the start: a rate over a series that appears only at
        // the first restart would miss it.
        for kind in [RestartKind::Failure, RestartKind::Preemption] {
            let _created = inner
                .restarts
                .get_or_create(&KindLabel { kind: kind.label() });
        }
        Metrics {
            registry: Arc::new(registry),
            m: Arc::new(inner),
        }
    }

    /// The run has entered `stage`.
    pub fn enter_stage(&self, stage: &str) {
        let mut current = self
            .m
            .current_stage
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if current.as_deref() == Some(stage) {
            return;
        }
        if let Some(left) = current.replace(stage.to_string()) {
            self.m
                .stage
                .get_or_create(&StageLabel { stage: left })
                .set(0);
        }
        self.m.stage.get_or_create(&stage_label(stage)).set(1);
    }

    /// A training task of `steps` steps in all is ordered in `stage`.
    pub fn plan_steps(&self, stage: &str, steps: u64) {
        let steps = i64::try_from(steps).unwrap_or(i64::MAX);
        self.m
            .steps_planned
            .get_or_create(&stage_label(stage))
            .set(steps);
    }

    /// A step report of `stage`; only rank 0's are taken (as the console's step lines), so
    /// the series are one rank's curve.
    pub fn step(&self, stage: &str, r: &StepReport) {
        if r.rank != 0 {
            return;
        }
        let label = stage_label(stage);
        let step = i64::try_from(r.step).unwrap_or(i64::MAX);
        self.m.step.get_or_create(&label).set(step);
        for (part, value) in [("total", r.loss), ("kl", r.kl), ("ce", r.ce)] {
            let labels = LossLabels {
                stage: stage.to_string(),
                part,
            };
            self.m.loss.get_or_create(&labels).set(value);
        }
        self.m.learning_rate.get_or_create(&label).set(r.lr);
        self.m
            .samples_per_second
            .get_or_create(&label)
            .set(r.samples_per_s);
        self.m.grad_norm.get_or_create(&label).set(r.grad_norm);
    }

    /// The workers are being restarted.
    pub fn restarted(&self, kind: RestartKind) {
        self.m
            .restarts
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }

    /// The gauge of workers alive, for the control server to keep (`ControlServer::count_alive`).
    pub fn workers_alive(&self) -> Gauge {
        self.m.workers_alive.clone()
    }

    /// The checkpoint of `step` is committed, now.
    pub fn committed(&self, step: u64) {
        self.m.checkpoints_committed.inc();
        self.m.last_checkpoint.set(step, Instant::now());
    }

    /// The registry in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and no metric here fails to encode.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        text
    }
}

fn stage_label(stage: &str) -> StageLabel {
    StageLabel {
        stage: stage.to_string(),
    }
}

/// The newest checkpoint this coordinator committed and when: its step and its age at the
/// moment of the scrape. Neither series exists before the first commit, so a dashboard shows
/// "none yet" rather than a checkpoint of step 0.
#[derive(Debug, Default)]
struct LastCheckpoint(Mutex<Option<(u64, Instant)>>);

impl LastCheckpoint {
    fn set(&self, step: u64, at: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((step, at));
    }
}

impl Collector for LastCheckpoint {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let last = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some((step, at)) = last else {
            return Ok(());
        };
        let step = ConstGauge::new(i64::try_from(step).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "checkpoint_step",
            "Step of the newest checkpoint this coordinator committed.",
            None,
            step.metric_type(),
        )?;
        step.encode(metric)?;
        let age = ConstGauge::new(at.elapsed().as_secs_f64());
        let metric = encoder.encode_descriptor(
            "checkpoint_age",
            "Time since the newest checkpoint was committed.",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?;
        age.encode(metric)
    }
}

/// The endpoint: serves `metrics` at `/metrics` until dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `listen` and serves `metrics` there on the current runtime. A port taken or an
    /// address not of this host fails here, naming the address.
    pub async fn start(listen: SocketAddr, metrics: Metrics) -> Result<MetricsServer> {
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("binding the metrics endpoint on {listen} (--metrics-listen, control.metrics_listen)")
        })?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("the metrics endpoint bound on {listen}"))?;
        let task = tokio::spawn(accept(listener, metrics));
        Ok(MetricsServer { addr, task })
    }

    /// The address it listens on (the port chosen when the one asked was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections for ever; each is served on its own task, at most `MAX_CONNECTIONS`
/// at once and for at most `CONNECTION_LIMIT`.
async fn accept(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be freed.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint: too many connections; closed");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIMIT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed")
                }
                Err(_) => tracing::debug!(%peer, "metrics endpoint: connection timed out"),
            }
            drop(slot);
        });
    }
}

/// `GET /metrics` (or `HEAD`): the registry; any other path 404, any other method 405.
fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    match *req.method() {
        Method::GET | Method::HEAD => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            metrics.encode(),
        ),
        _ => {
            let mut response = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".into(),
            );
            response.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests;
