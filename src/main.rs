//! `xkd`: parses the command line and hands over to the coordinator or the worker.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use xkd_config::{Config, ConfigError, DeviceChoice};
use xkd_coordinator::run::{self, Goal, LocalWorkers, Outcome, RunOptions};
use xkd_protocol::transport::{check_certificate, Fingerprint, ServerIdentity, Trust};
use xkd_worker::ring_host::RingHost;
use xkd_worker::session::Exit;

mod inspect;

#[derive(Parser)]
#[command(
    name = "xkd",
    version,
    about = "Cross-modal knowledge distillation between multimodal models"
)]
struct Cli {
    /// Log output: `pretty` for people, `json` for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Pretty => "pretty",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML recipe laid over the embedded default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set distill.alpha=1.0`; repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
}

/// A certificate the coordinator presents instead of making one (a Kubernetes Secret,
/// cert-manager's `tls.crt` and `tls.key`).
#[derive(Args, Clone)]
struct TlsArgs {
    /// PEM: the coordinator's certificate, then any intermediates.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn identity(&self) -> Result<Option<ServerIdentity>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let identity = ServerIdentity::from_pem(&read(cert)?, &read(key)?).with_context(|| {
            format!("--tls-cert {} --tls-key {}", cert.display(), key.display())
        })?;
        Ok(Some(identity))
    }
}

/// Where the coordinator serves Prometheus metrics.
#[derive(Args, Clone)]
struct MetricsArgs {
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (IP:PORT; port 0 picks a free
    /// port, logged as `metrics listening`); overrides control.metrics_listen.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

impl MetricsArgs {
    fn apply(&self, config: &mut Config) {
        if let Some(addr) = self.metrics_listen {
            config.control.metrics_listen = addr.to_string();
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// The whole job on this machine: coordinator plus local worker processes.
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Worker processes to start (default: control.workers of the config, 2 in the
        /// embedded default).
        #[arg(long)]
        workers: Option<usize>,
        /// Output directory (default runs/<run id>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Cluster mode: the coordinator alone; workers join with `xkd worker`.
    Coordinator {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// QUIC address to listen on (overrides control.listen).
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Cluster mode: one worker.
    Worker {
        /// The coordinator's QUIC address, `IP:PORT` or `HOST:PORT` (resolved once, at start;
        /// a name that does not resolve yet exits 1, so the launcher retries).
        #[arg(long, value_parser = host_port)]
        coordinator: String,
        /// The coordinator's certificate (DER), written into its output directory at start.
        #[arg(
            long,
            env = "XKD_COORDINATOR_CERT",
            required_unless_present = "fingerprint"
        )]
        cert: Option<PathBuf>,
        /// Pins the coordinator by its certificate's SHA-256 (64 hex digits; it logs it at
        /// start as `fingerprint`), so the certificate file need not reach this node. With
        /// `--cert` too, the file must have this fingerprint.
        #[arg(long, env = "XKD_COORDINATOR_FINGERPRINT", value_parser = fingerprint)]
        fingerprint: Option<Fingerprint>,
        /// Host name or address of this host to bind the gradient ring (the CPU collective)
        /// on; the default is the address this host uses to reach the coordinator.
        #[arg(
            long,
            env = "XKD_COLLECTIVE_HOST",
            conflicts_with = "collective_interface"
        )]
        collective_host: Option<String>,
        /// Network interface whose address the gradient ring binds, e.g. the cluster's
        /// private network (the same name on every node, as NCCL_SOCKET_IFNAME for NCCL).
        #[arg(long, env = "XKD_COLLECTIVE_INTERFACE", value_name = "NAME")]
        collective_interface: Option<String>,
    },
    /// Inspect the resolved config.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Run the stages up to the heuristic and print the hard-class decision as JSON.
    HardClasses {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Per-class accuracy of a checkpointed student on the eval split (coordinator plus local
    /// workers, as `run`): printed as a table (or JSON with --json) and written to OUT/eval.json.
    /// The config must be the checkpoint's run's (its models and data).
    Eval {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// A checkpoint (`<store>/<run_id>/ckpt/<step>`) or a run (its newest checkpoint):
        /// `file://`, a plain path, `s3://`, `gs://`, `az://`.
        #[arg(long, value_name = "URL")]
        checkpoint: String,
        #[arg(long)]
        workers: Option<usize>,
        /// Output directory (default runs/<run id>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the evaluation as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The whole job three times on one recipe, distilling on the heuristic's hard classes, on
    /// all classes and on as many random ones (`distill.classes`); writes each run under
    /// OUT/<hard|all|random>/ and the side-by-side table to OUT/comparison.md.
    Compare {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Memory of one worker, part by part (weights, adapters and optimizer, activations of a
    /// distillation step and of evaluation, feature cache, loader window, the process), from
    /// the config and the models' architectures, and whether it fits a device. Runs nothing.
    Plan {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Device memory to fit in, GiB (default: 80 on a GPU, an H100's; on a CPU this
        /// machine's memory over control.workers).
        #[arg(long, value_name = "GIB", value_parser = positive_f64)]
        device_gib: Option<f64>,
        /// Source video frame size of a prepared dataset, HEIGHTxWIDTH, for a Qwen2-VL model
        /// (frames are kept 2 a second, in multiples of 28 under a pixel cap, as `xkd data
        /// prepare` keeps them). VGGSound's clips are mostly 360x640.
        #[arg(long, value_name = "HxW", default_value = "360x640", value_parser = frame_size)]
        frame_size: (usize, usize),
        /// Print the plan as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect a checkpoint store (read-only).
    Checkpoint {
        #[command(subcommand)]
        action: CheckpointAction,
    },
    /// Data a run reads besides its clips.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
}

#[derive(Subcommand)]
enum DataAction {
    /// A dataset workers read (`data.source = "manifest"`, `data.dir = OUT`) from downloaded
    /// clips: each clip decoded by FFmpeg (Debian's `ffmpeg` package), its audio resampled to
    /// `data.sample_rate` mono for `data.clip_seconds`, its frames kept as the visual model
    /// needs. Resumable: a re-run keeps finished clips. Bad clips are skipped and listed in
    /// OUT/bad_clips.jsonl with their reason.
    Prepare {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The clip list: VGGSound's CSV, or `path,label[,split]` (see --format).
        #[arg(long, value_name = "FILE")]
        csv: PathBuf,
        #[arg(long, value_enum, default_value_t = ListFormat::Vggsound)]
        format: ListFormat,
        /// The directory holding the clips the CSV names.
        #[arg(long, value_name = "DIR")]
        clips: PathBuf,
        /// Where the dataset goes (created; a re-run resumes in it): a directory, or an
        /// object-store URL (`s3://`, `gs://`, `az://`), prepared in
        /// `<run.cache_dir>/prepare/remote-<digest>` and uploaded, the manifest last.
        #[arg(long, value_name = "DIR|URL")]
        out: String,
        /// Class names in label order, one a line; rows with another label are skipped.
        /// Without it, the CSV's labels, sorted.
        #[arg(long, value_name = "FILE")]
        classes: Option<PathBuf>,
        /// The frames kept; by default what the config's visual model takes.
        #[arg(long, value_enum)]
        frames: Option<FrameLayout>,
        /// Frames per second with `--frames qwen2-vl`.
        #[arg(long, default_value_t = xkd_data::prepare::QWEN2_VL_FPS, value_parser = positive_f64)]
        fps: f64,
        /// Pixels per frame at most with `--frames qwen2-vl` (at least one 28 x 28 patch).
        #[arg(long, default_value_t = xkd_data::prepare::QWEN2_VL_MAX_PIXELS as u64,
              value_parser = clap::value_parser!(u64).range(784..))]
        max_pixels: u64,
        /// Shares of the `train` rows for the pretrain, probe and distill splits (`test` rows
        /// are the eval split).
        #[arg(long, value_name = "PRETRAIN,PROBE,DISTILL", default_value = "0.5,0.2,0.3",
              value_parser = train_shares)]
        shares: xkd_data::prepare::TrainShares,
        /// Clips decoded at once; by default one per core.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        jobs: Option<u64>,
    },
    /// The heuristic's human prior (`heuristic.prior_csv`) from VGGSounder's labels: per
    /// class, the share of its labels that people perceived with the student's sense.
    Prior {
        /// VGGSounder's label file: `vggsounder/data/vggsounder.csv` of PyPI's `vggsounder`.
        #[arg(long)]
        vggsounder: PathBuf,
        /// The student's modality: `audio` (the share heard) or `visual` (the share seen).
        #[arg(long, value_enum)]
        student: Sense,
        /// Where to write the `class,prior` CSV.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The CSV layouts `xkd data prepare` reads.
#[derive(Clone, Copy, ValueEnum)]
enum ListFormat {
    /// VGGSound's CSV: `youtube_id,start_seconds,label,split`, no header.
    Vggsound,
    /// `path,label[,split]`, no header: any other audio-visual set.
    Paths,
}

/// Which frames `xkd data prepare` keeps.
#[derive(Clone, Copy, ValueEnum)]
enum FrameLayout {
    /// `data.frames` frames of `data.frame_size` squared pixels: the stand-ins' input.
    Standin,
    /// `--fps` frames a second, an even count, sized to multiples of 28 under `--max-pixels`.
    Qwen2Vl,
}

#[derive(Clone, Copy, ValueEnum)]
enum Sense {
    Audio,
    Visual,
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// A run's committed checkpoints, newest first: step, size, age.
    Ls {
        /// `<store>/<run_id>`, e.g. `s3://bucket/prefix/run-1` or `runs/ckpts/run-1`.
        url: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every object against its manifest; exit 1 and name each bad object on mismatch.
    Verify {
        /// A checkpoint (`<store>/<run_id>/ckpt/<step>`) or a run (then its newest checkpoint).
        url: String,
        /// With a run URL: every committed checkpoint, not only the newest.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One sha256 over the trainable parameters (student.safetensors), for comparing runs.
    Digest {
        /// A checkpoint (`<store>/<run_id>/ckpt/<step>`) or a run (then its newest checkpoint).
        url: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the resolved config as TOML.
    Show {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The tests' pause point is read by workers mid-run; a malformed one is refused here,
    // before anything starts, instead of failing every generation of workers.
    if let Err(e) = xkd_worker::hold::Hold::from_env() {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) if is_usage_error(&e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Config errors and bad store URLs are usage errors: exit status 2.
fn is_usage_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ConfigError>().is_some()
        || e.downcast_ref::<xkd_checkpoint::Error>()
            .is_some_and(xkd_checkpoint::Error::is_usage)
}

/// The config of `cfg`, with `--workers` (when given) as `control.workers`.
fn resolve(cfg: &ConfigArgs, workers: Option<usize>) -> Result<Config, ConfigError> {
    let mut sets = cfg.sets.clone();
    if let Some(n) = workers {
        sets.insert(0, format!("control.workers={n}"));
    }
    Config::resolve(cfg.config.as_deref(), &sets)
}

/// The config of `cfg` for a command that will run it: also refuses a device this binary
/// cannot drive, before any work starts (the config itself is valid; `config show` prints it).
fn resolve_to_run(cfg: &ConfigArgs, workers: Option<usize>) -> Result<Config, ConfigError> {
    let config = resolve(cfg, workers)?;
    if let DeviceChoice::Cuda(_) = config.run.device_choice() {
        if !xkd_worker::train::cuda_compiled() {
            return Err(ConfigError::BadValue {
                key: "run.device".into(),
                message: format!(
                    "`{}` needs CUDA, but this binary was built without the `cuda` feature; \
                     use `cpu`",
                    config.run.device
                ),
            });
        }
    }
    Ok(config)
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let log_format = cli.log_format.as_str().to_string();
    match cli.command {
        Command::Config {
            action: ConfigAction::Show { cfg },
        } => {
            print!("{}", resolve(&cfg, None)?.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            cfg,
            device_gib,
            frame_size,
            json,
        } => {
            let config = resolve(&cfg, None)?;
            let options = xkd_worker::plan::Options {
                device_bytes: device_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
                frame_size,
            };
            let plan = xkd_worker::plan::plan(&config, &options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", xkd_worker::plan::text(&plan));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            cfg,
            workers,
            out,
            tls,
            metrics,
        } => {
            let mut config = resolve_to_run(&cfg, workers)?;
            metrics.apply(&mut config);
            let local = local_workers(&config, log_format)?;
            let identity = tls.identity()?;
            match runtime()?.block_on(run::run(RunOptions {
                config,
                out_dir: out,
                local: Some(local),
                goal: Goal::Report,
                identity,
            }))? {
                Outcome::Finished(report) => {
                    print!("{}", xkd_coordinator::report::markdown(&report));
                    Ok(ExitCode::SUCCESS)
                }
                Outcome::Preempted => Ok(ExitCode::SUCCESS),
                Outcome::HardClasses(_) | Outcome::Evaluated(_) => {
                    unreachable!("a full run ends with its report")
                }
            }
        }
        Command::HardClasses {
            cfg,
            workers,
            out,
            tls,
        } => {
            let config = resolve_to_run(&cfg, workers)?;
            let local = local_workers(&config, log_format)?;
            let identity = tls.identity()?;
            let outcome = runtime()?.block_on(run::run(RunOptions {
                config,
                out_dir: out,
                local: Some(local),
                goal: Goal::HardClasses,
                identity,
            }))?;
            if let Outcome::HardClasses(decision) = outcome {
                println!("{}", serde_json::to_string_pretty(&decision)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            cfg,
            checkpoint,
            workers,
            out,
            json,
        } => {
            let config = resolve_to_run(&cfg, workers)?;
            // A bad URL is a usage error, found before any process starts.
            xkd_checkpoint::Target::open(&checkpoint, Default::default())?;
            let local = local_workers(&config, log_format)?;
            let outcome = runtime()?.block_on(run::run(RunOptions {
                config,
                out_dir: out,
                local: Some(local),
                goal: Goal::Evaluate { checkpoint },
                identity: None,
            }))?;
            match outcome {
                Outcome::Evaluated(e) if json => {
                    println!("{}", serde_json::to_string_pretty(&e)?);
                }
                Outcome::Evaluated(e) => {
                    print!("{}", xkd_coordinator::report::evaluation_markdown(&e));
                }
                _ => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { cfg, workers, out } => {
            // All three configs are resolved, and so checked, before the first run starts: a
            // run id too long for its suffix exits 2 here, not after a finished run.
            let base = resolve_to_run(&cfg, workers)?;
            let mut configs = Vec::new();
            for classes in xkd_config::DistillClasses::ALL {
                let mut mode = cfg.clone();
                mode.sets
                    .push(format!("distill.classes=\"{}\"", classes.as_str()));
                if !base.run.run_id.is_empty() {
                    let id = format!("{}-{}", base.run.run_id, classes.as_str());
                    mode.sets.push(format!("run.run_id=\"{id}\""));
                }
                configs.push(resolve_to_run(&mode, workers)?);
            }
            let table = compare(configs, &out, log_format)?;
            print!("{table}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator {
            cfg,
            listen,
            out,
            tls,
            metrics,
        } => {
            let mut config = resolve_to_run(&cfg, None)?;
            if let Some(addr) = listen {
                config.control.listen = addr;
            }
            metrics.apply(&mut config);
            let identity = tls.identity()?;
            let outcome = runtime()?.block_on(run::run(RunOptions {
                config,
                out_dir: out,
                local: None,
                goal: Goal::Report,
                identity,
            }))?;
            if let Outcome::Finished(report) = outcome {
                print!("{}", xkd_coordinator::report::markdown(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoint { action } => runtime()?
            .block_on(async {
                match action {
                    CheckpointAction::Ls { url, json } => inspect::ls(&url, json).await,
                    CheckpointAction::Verify { url, all, json } => {
                        inspect::verify(&url, all, json).await
                    }
                    CheckpointAction::Digest { url, json } => inspect::digest(&url, json).await,
                }
            })
            .map(|()| ExitCode::SUCCESS),
        Command::Data {
            action:
                DataAction::Prepare {
                    cfg,
                    csv,
                    format,
                    clips,
                    out,
                    classes,
                    frames,
                    fps,
                    max_pixels,
                    shares,
                    jobs,
                },
        } => {
            use xkd_data::prepare::{self, Frames, Options, Settings};
            let config = resolve(&cfg, None)?;
            let data = &config.data;
            let layout = frames.unwrap_or(match config.visual_model.family {
                xkd_config::ModelFamily::Qwen2 => FrameLayout::Qwen2Vl,
                _ => FrameLayout::Standin,
            });
            let frames = match layout {
                FrameLayout::Standin => Frames::Standin {
                    count: data.frames,
                    size: data.frame_size,
                },
                FrameLayout::Qwen2Vl => Frames::Qwen2Vl {
                    fps,
                    max_pixels: max_pixels as usize,
                },
            };
            let jobs = jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                |j| j as usize,
            );
            let remote = out.contains("://").then(|| out.clone());
            if let Some(url) = &remote {
                // A bad URL is a usage error, before any clip is decoded.
                xkd_checkpoint::Store::open(url)?;
            }
            let out = match &remote {
                Some(url) => PathBuf::from(&config.run.cache_dir)
                    .join("prepare")
                    .join(format!("remote-{}", xkd_config::section_digest(url))),
                None => PathBuf::from(out),
            };
            let options = Options {
                list: csv,
                format: match format {
                    ListFormat::Vggsound => prepare::ListFormat::Vggsound,
                    ListFormat::Paths => prepare::ListFormat::Paths,
                },
                clips,
                out,
                classes,
                settings: Settings {
                    seconds: data.clip_seconds as f64,
                    sample_rate: data.sample_rate,
                    frames,
                },
                shares,
                seed: data.seed,
                jobs,
            };
            let summary = prepare_with_progress(&options)?;
            let mut report = prepare_report(&options, &summary);
            if let Some(url) = remote {
                let store = xkd_checkpoint::Store::open(&url)?;
                let last = [
                    xkd_data::CLASSES_FILE,
                    xkd_data::prepare::BAD_CLIPS_FILE,
                    xkd_data::prepare::SUMMARY_FILE,
                    xkd_data::MANIFEST_FILE,
                ];
                tracing::info!(url, from = %options.out.display(), "uploading the dataset");
                let (uploaded, kept) = runtime()?
                    .block_on(store.upload_prefix(&options.out, &last))
                    .with_context(|| format!("uploading the dataset to {url}"))?;
                report = report.replace(&options.out.display().to_string(), &url);
                report += &format!(
                    "  uploaded {uploaded} files to {url} ({kept} were there already); \
                     prepared in {}\n",
                    options.out.display()
                );
            }
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Data {
            action:
                DataAction::Prior {
                    vggsounder,
                    student,
                    out,
                },
        } => {
            let modality = match student {
                Sense::Audio => xkd_config::Modality::Audio,
                Sense::Visual => xkd_config::Modality::Visual,
            };
            let priors = xkd_data::prior::vggsounder_priors(&vggsounder, modality)?;
            xkd_data::prior::write_priors(&out, &priors)?;
            let rows: u64 = priors.iter().map(|p| p.rows).sum();
            println!(
                "{}: {} classes from {rows} VGGSounder labels ({} student); set \
                 heuristic.prior_csv = \"{}\"",
                out.display(),
                priors.len(),
                modality.as_str(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            coordinator,
            cert,
            fingerprint,
            collective_host,
            collective_interface,
        } => {
            let coordinator = coordinator_addr(&coordinator)?;
            let token = std::env::var("XKD_JOIN_TOKEN")
                .context("XKD_JOIN_TOKEN is not set: a worker needs the run's join token")?;
            let trust = coordinator_trust(cert.as_deref(), fingerprint)?;
            let rt = runtime()?;
            let exit = rt.block_on(xkd_worker::session::run(xkd_worker::session::WorkerArgs {
                coordinator,
                trust,
                token,
                ring_host: ring_host(collective_host, collective_interface),
            }));
            // A task thread the coordinator abandoned (shutdown or restart mid-task) is not
            // waited for.
            rt.shutdown_background();
            Ok(match exit? {
                Exit::Finished | Exit::Terminated => ExitCode::SUCCESS,
                Exit::Restart => ExitCode::from(xkd_protocol::EXIT_RESTART),
            })
        }
    }
}

/// The three runs of `xkd compare`, one after another: the pretrained stand-ins are cached
/// after the first, so the others pretrain nothing. A run id given in the config gets the
/// mode as a suffix, so the runs never share checkpoints.
fn compare(configs: Vec<Config>, out: &std::path::Path, log_format: String) -> Result<String> {
    let rt = runtime()?;
    let mut reports = Vec::new();
    for config in configs {
        let classes = config.distill.classes;
        let local = local_workers(&config, log_format.clone())?;
        let outcome = rt.block_on(run::run(RunOptions {
            config,
            out_dir: Some(out.join(classes.as_str())),
            local: Some(local),
            goal: Goal::Report,
            identity: None,
        }))?;
        match outcome {
            Outcome::Finished(report) => reports.push(*report),
            _ => bail!(
                "the `{}` run stopped before its report (preempted?)",
                classes.as_str()
            ),
        }
    }
    let table = xkd_coordinator::report::comparison(&reports)?;
    let path = out.join("comparison.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    let json = out.join("comparison.json");
    std::fs::write(&json, serde_json::to_string_pretty(&reports)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(table)
}

/// `HOST:PORT` (or `[IPv6]:PORT`) in form; whether the host resolves is known only at start.
/// `xkd data prepare` with a bar on a terminal and a log line every ten seconds otherwise.
fn prepare_with_progress(
    options: &xkd_data::prepare::Options,
) -> Result<xkd_data::prepare::Summary> {
    use std::sync::Mutex;
    use xkd_coordinator::bars::Stage;
    let bar: Mutex<Option<Stage>> = Mutex::new(None);
    let every = xkd_data::prepare::Every::new(std::time::Duration::from_secs(10));
    let started = std::time::Instant::now();
    let progress = |done: usize, total: usize| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        bar.get_or_insert_with(|| Stage::counting("prepare", Some(total as u64), 0, "clips"))
            .set(done as u64);
        if every.due(done, total) {
            let secs = started.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = (total - done) as f64 / rate.max(1e-9);
            tracing::info!(
                done,
                total,
                clips_per_s = format!("{rate:.1}"),
                eta_s = format!("{eta:.0}"),
                "preparing clips"
            );
        }
    };
    let summary = xkd_data::prepare::prepare(options, &progress);
    drop(bar);
    summary
}

/// What `xkd data prepare` did, for a person: counts, bad clips by reason, and the rate per
/// core with what it means for VGGSound's 199,467 rows.
fn prepare_report(options: &xkd_data::prepare::Options, s: &xkd_data::prepare::Summary) -> String {
    use std::fmt::Write as _;
    let out = options.out.display();
    let mut text = format!(
        "{out}: {} rows, {} classes: {} clips prepared now, {} kept from an earlier run, {} bad\n",
        s.rows,
        s.classes,
        s.prepared,
        s.kept,
        s.bad_total()
    );
    for (reason, n) in &s.bad {
        let _ = writeln!(text, "  {n:>6} {}", reason.as_str());
    }
    if s.bad_total() > 0 {
        let _ = writeln!(
            text,
            "  listed with their lines in {}",
            options
                .out
                .join(xkd_data::prepare::BAD_CLIPS_FILE)
                .display()
        );
    }
    if s.prepared > 0 {
        let rate = s.prepared as f64 / s.seconds.max(1e-9);
        let per_core = rate / s.jobs as f64;
        let vggsound_h = 199_467.0 / rate / 3600.0;
        let _ = writeln!(
            text,
            "  {rate:.2} clips/s on {} jobs ({per_core:.2} clips/s per job): VGGSound's 199,467 \
             rows would take {vggsound_h:.1} h here",
            s.jobs
        );
        let _ = writeln!(
            text,
            "  {:.1} MB of clips became {:.1} MB ({:.2}x)",
            s.source_bytes as f64 / 1e6,
            s.prepared_bytes as f64 / 1e6,
            s.prepared_bytes as f64 / s.source_bytes.max(1) as f64
        );
    }
    let _ = writeln!(
        text,
        "  train with --set data.source=manifest --set data.dir={out}"
    );
    text
}

fn positive_f64(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{arg}` is not a positive number")),
    }
}

/// `HEIGHTxWIDTH` in pixels, each at least 1.
fn frame_size(arg: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{arg}` is not HEIGHTxWIDTH in pixels, e.g. 360x640");
    let (h, w) = arg.split_once(['x', 'X']).ok_or_else(bad)?;
    match (h.trim().parse::<usize>(), w.trim().parse::<usize>()) {
        (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(bad()),
    }
}

fn train_shares(arg: &str) -> Result<xkd_data::prepare::TrainShares, String> {
    let parts: Vec<f64> = arg
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{arg}` is not three numbers PRETRAIN,PROBE,DISTILL"))?;
    match parts[..] {
        [pretrain, probe, distill]
            if parts.iter().all(|p| p.is_finite() && *p >= 0.0)
                && parts.iter().sum::<f64>() > 0.0 =>
        {
            Ok(xkd_data::prepare::TrainShares {
                pretrain,
                probe,
                distill,
            })
        }
        _ => Err(format!(
            "`{arg}` must be three shares PRETRAIN,PROBE,DISTILL, none negative, not all zero"
        )),
    }
}

fn host_port(arg: &str) -> Result<String, String> {
    match arg.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(arg.into()),
        _ => Err(format!("{arg:?} is not HOST:PORT")),
    }
}

fn fingerprint(arg: &str) -> Result<Fingerprint, String> {
    Fingerprint::parse(arg).map_err(|e| e.to_string())
}

/// What a worker trusts: the certificate file (which must have the pinned fingerprint when
/// one is given too), or else the pin alone. clap has made sure one of them is there.
fn coordinator_trust(cert: Option<&Path>, pin: Option<Fingerprint>) -> Result<Trust> {
    let Some(cert) = cert else {
        return pin
            .map(Trust::Fingerprint)
            .context("neither --cert nor XKD_COORDINATOR_FINGERPRINT names the coordinator");
    };
    let der = std::fs::read(cert)
        .with_context(|| format!("reading the coordinator certificate {}", cert.display()))?;
    check_certificate(&der)
        .with_context(|| format!("the coordinator certificate {}", cert.display()))?;
    if let Some(pin) = pin {
        let got = Fingerprint::of(&der);
        if got != pin {
            bail!(
                "the coordinator certificate {} has SHA-256 fingerprint {got}, but {pin} was pinned",
                cert.display()
            );
        }
    }
    Ok(Trust::Certificate(der))
}

/// Where the worker's gradient ring listens; clap has made sure at most one is given.
fn ring_host(host: Option<String>, interface: Option<String>) -> RingHost {
    match (host, interface) {
        (Some(host), _) => RingHost::Named(host),
        (None, Some(name)) => RingHost::Interface(name),
        (None, None) => RingHost::TowardsCoordinator,
    }
}

/// `addr` as a socket address: an `IP:PORT` as it is, a `HOST:PORT` through the resolver (a
/// launcher knows the coordinator by its node's or its service's name), IPv4 first.
fn coordinator_addr(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| {
            format!("--coordinator {addr}: not an IP:PORT or a HOST:PORT that resolves")
        })?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .with_context(|| format!("--coordinator {addr}: the name resolves to no address"))
}

fn local_workers(config: &Config, log_format: String) -> Result<LocalWorkers> {
    Ok(LocalWorkers {
        exe: std::env::current_exe().context("locating the xkd executable")?,
        count: config.control.workers,
        threads: config.run.threads_per_worker,
        log_format,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("XKD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal (and not under NO_COLOR): a log redirected to a file, as
    // Slurm and `xkd run`'s worker logs are, stays plain text.
    let colour = xkd_coordinator::bars::on_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(|| xkd_coordinator::bars::LogWriter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.compact().with_target(false).init(),
    }
}
