//! What each fuzz target does with one input, and the seeds each starts from.
//!
//! Every target feeds bytes to the code that meets them in a run, through the same entry point,
//! without a network: the frame reader over an in-memory stream, the coordinator's join check
//! (`xkd_coordinator::server::read_join`), and the config's resolution (`Config::from_toml`,
//! `Config::resolve_text`). Any input may be refused; none may panic. A panic (or an abort) is
//! what honggfuzz records as a crash. Beyond "no panic", each target checks what the rest of
//! the system relies on: a decoded message encodes again to the same bytes, a refused join has
//! a `Reject` the coordinator can send, an accepted config round-trips through the TOML the
//! workers receive.

use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::io::Cursor;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use xkd_config::Config;
use xkd_coordinator::server::read_join;
use xkd_protocol::frame::{encode, read_frame, MAX_FRAME_BYTES};
use xkd_protocol::*;

/// The join token the join target's coordinator holds; seeds carry it so the fuzzer starts
/// past the token check.
pub const TOKEN: &str = "fuzz-token-7f3a";

/// Runs a future that reads only from memory: it never waits, so one poll finishes it.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

/// Target `frame`: `data` as a stream of frames, read as the coordinator reads a worker
/// (`WorkerMsg`) and as a worker reads the coordinator (`CoordinatorMsg`), until the first
/// error, like the readers in a run.
pub fn frame(data: &[u8]) {
    read_stream::<WorkerMsg>(data);
    read_stream::<CoordinatorMsg>(data);
}

fn read_stream<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let mut r = Cursor::new(data);
    loop {
        match now(read_frame::<T, _>(&mut r, MAX_FRAME_BYTES)) {
            Ok(msg) => encodes_again(&msg),
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        }
    }
}

/// A decoded message encodes, and its encoding decodes to a message with the same encoding
/// (bytes, not `PartialEq`: a NaN float is a legal payload).
fn encodes_again<T: Serialize + DeserializeOwned>(msg: &T) {
    let frame = encode(msg).expect("a decoded message encodes");
    let again: T = now(read_frame(&mut Cursor::new(&frame[..]), MAX_FRAME_BYTES))
        .expect("an encoded message decodes");
    assert_eq!(encode(&again).expect("it encodes again"), frame);
}

/// Target `join`: `data` as the first bytes of a connection's control stream, through the
/// coordinator's `read_join` against `TOKEN`.
pub fn join(data: &[u8]) {
    match now(read_join(&mut Cursor::new(data), TOKEN)) {
        Ok(join) => {
            assert!(join.token.is_empty(), "an admitted join keeps its token");
            assert_eq!(join.protocol_version, PROTOCOL_VERSION);
            let _ = format!("{join:?}");
        }
        Err(reject) => {
            let _ = reject.to_string();
            encode(&CoordinatorMsg::Reject(reject)).expect("every reject can be sent");
        }
    }
}

/// Target `config`: `data` as UTF-8 (lossy), split at NUL bytes, which neither a TOML file nor
/// a command-line argument can hold: the first piece is a config file's text, every further
/// piece one `--set` argument.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut pieces = text.split('\0');
    let file = pieces.next().unwrap_or_default();
    let overrides: Vec<String> = pieces.map(str::to_string).collect();
    config_accepted(Config::from_toml(file));
    config_accepted(Config::resolve_text(Some((file, "fuzz.toml")), &overrides));
    config_accepted(Config::resolve_text(None, &overrides));
}

/// An accepted config is what goes to the workers: its TOML parses back to the same TOML, and
/// what the run computes from it first does not panic.
fn config_accepted(resolved: Result<Config, xkd_config::ConfigError>) {
    let config = match resolved {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let text = config.to_toml();
    let back = Config::from_toml(&text).expect("a resolved config parses back");
    assert_eq!(back.to_toml(), text);
    assert_eq!(back.digest(), config.digest());
    let _ = (config.run.device_choice(), config.clip_samples());
    let _ = xkd_config::section_digest(&config.distill);
}

/// Writes the seed corpus of `target` into `dir`: real inputs made by the encoder, or the
/// repository's configs.
pub fn write_seeds(target: &str, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let seeds = match target {
        "frame" => frame_seeds(),
        "join" => join_seeds(),
        "config" => config_seeds()?,
        other => {
            return Err(std::io::Error::other(format!("no target {other}")));
        }
    };
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), seed)?;
    }
    Ok(seeds.len())
}

fn good_join() -> Join {
    Join {
        protocol_version: PROTOCOL_VERSION,
        token: TOKEN.into(),
        collective_addr: "127.0.0.1:4000".into(),
        hostname: "node-a".into(),
        pid: 42,
    }
}

fn worker_msgs() -> Vec<WorkerMsg> {
    vec![
        WorkerMsg::Join(good_join()),
        WorkerMsg::heartbeat(7),
        WorkerMsg::SaveFailed {
            task: 3,
            step: 200,
            error: "store unreachable".into(),
        },
        WorkerMsg::Done {
            task: 2,
            result: TaskResult::Trained(TrainSummary {
                steps: 3,
                stopped: false,
                final_loss: 0.1,
                wall_seconds: 2.5,
                digest: "ab".into(),
                reused: false,
            }),
        },
        WorkerMsg::Failed {
            task: 4,
            error: "boom".into(),
            kind: FailureKind::Transient,
        },
        WorkerMsg::CollectiveId {
            id: vec![7; NCCL_UNIQUE_ID_BYTES],
        },
    ]
}

fn coordinator_msgs() -> Vec<CoordinatorMsg> {
    vec![
        CoordinatorMsg::Assignment(Assignment {
            run_id: "run".into(),
            rank: 1,
            world_size: 2,
            peers: vec!["a:1".into(), "b:2".into()],
            collective: CollectiveKind::TcpRing,
            config_toml: Config::embedded().to_toml(),
            config_digest: "d".into(),
            out_dir: "/out".into(),
        }),
        CoordinatorMsg::Task(Task {
            id: 1,
            kind: TaskKind::PrepareData,
        }),
        CoordinatorMsg::Stop { task: 9 },
        CoordinatorMsg::Restart {
            reason: "rank 1 lost".into(),
        },
        CoordinatorMsg::Reject(Reject::VersionMismatch {
            expected: 1,
            got: 2,
        }),
    ]
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let frames = |msgs: Vec<Vec<u8>>| {
        let stream = msgs.concat();
        msgs.into_iter().chain([stream]).collect::<Vec<_>>()
    };
    let worker = worker_msgs().iter().map(|m| encode(m).unwrap()).collect();
    let coordinator = coordinator_msgs()
        .iter()
        .map(|m| encode(m).unwrap())
        .collect();
    frames(worker)
        .into_iter()
        .chain(frames(coordinator))
        .collect()
}

fn join_seeds() -> Vec<Vec<u8>> {
    let with = |f: &dyn Fn(&mut Join)| {
        let mut join = good_join();
        f(&mut join);
        encode(&WorkerMsg::Join(join)).unwrap()
    };
    vec![
        with(&|_| {}),
        with(&|j| j.token = "fuzz-token-7f3b".into()),
        with(&|j| j.token.clear()),
        with(&|j| j.protocol_version = PROTOCOL_VERSION - 1),
        encode(&WorkerMsg::heartbeat(0)).unwrap(),
    ]
}

/// The repository's configs (the `.toml` files of `configs/`; its `arch/` folder holds model
/// architectures, not recipes), alone and followed by a few `--set` arguments.
fn config_seeds() -> std::io::Result<Vec<Vec<u8>>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "toml"));
    files.sort();
    let sets = "\0distill.alpha=0.5\0run.device=cuda:1\0distill.direction=audio_to_visual";
    let mut seeds = vec![sets.as_bytes().to_vec()];
    for file in files {
        let text = std::fs::read(&file).map_err(|e| {
            std::io::Error::new(e.kind(), format!("reading {}: {e}", file.display()))
        })?;
        seeds.push([&text[..], sets.as_bytes()].concat());
        seeds.push(text);
    }
    Ok(seeds)
}

/// A target binary's main: `--seeds DIR` writes the seeds and exits; `--replay FILE...` runs
/// each file through the target once, outside honggfuzz, so a crash's panic message shows;
/// otherwise it fuzzes (under `cargo hfuzz run`).
pub fn main(target: &str, run: fn(&[u8])) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((flag, [dir])) if flag == "--seeds" => match write_seeds(target, Path::new(dir)) {
            Ok(n) => println!("{target}: {n} seeds in {dir}"),
            Err(e) => {
                eprintln!("{target}: cannot write seeds into {dir}: {e}");
                std::process::exit(1);
            }
        },
        Some((flag, files)) if flag == "--replay" => {
            for file in files {
                let data = std::fs::read(file).expect("reading the input to replay");
                eprintln!("{target}: replaying {file} ({} bytes)", data.len());
                run(&data);
            }
            eprintln!("{target}: no panic");
        }
        _ => loop {
            honggfuzz::fuzz!(|data: &[u8]| { run(data) });
        },
    }
}
