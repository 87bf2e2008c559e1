//! The frame codec: how one message crosses a byte stream.
//!
//! A frame is `u32` big-endian `N` (the length of what follows), then `u16` big-endian protocol
//! version, then `N - 2` bytes of bincode 2 (serde, standard config). The reader checks the
//! header before it touches the body, so a peer announcing a huge frame or speaking another
//! version costs us six bytes of reading and no allocation.

use crate::messages::PROTOCOL_VERSION;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest `N` (version plus payload) any frame may announce.
pub const MAX_FRAME_BYTES: u32 = 8 << 20;

/// Bytes of the version field, counted in `N`.
const VERSION_BYTES: u32 = 2;

/// How much of a body is allocated before its bytes actually arrive: a peer that announces a
/// large frame and then trickles must not make us reserve the whole frame up front.
const INITIAL_BODY_CAPACITY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {got} bytes exceeds the limit of {limit}")]
    Oversized { limit: u32, got: u32 },
    #[error("frame has protocol version {got}, expected {expected}")]
    Version { expected: u16, got: u16 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("i/o error while reading or writing a frame: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended cleanly where a frame would have started.
    #[error("stream closed")]
    Closed,
}

/// The bincode configuration of every payload. The limit bounds what the decoder may claim
/// for strings and byte buffers, so a forged length inside a small frame cannot make it
/// allocate more than a frame could carry.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME_BYTES as usize }>()
}

/// Encodes `msg` as one complete frame (header included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| FrameError::Malformed(format!("cannot encode: {e}")))?;
    let n = frame_len(payload.len())?;
    let mut frame = Vec::with_capacity(4 + n as usize);
    frame.extend_from_slice(&n.to_be_bytes());
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// `N` for a payload of `payload_len` bytes, if it fits the limit.
fn frame_len(payload_len: usize) -> Result<u32, FrameError> {
    let got = u32::try_from(payload_len)
        .ok()
        .and_then(|p| p.checked_add(VERSION_BYTES))
        .unwrap_or(u32::MAX);
    if got > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            limit: MAX_FRAME_BYTES,
            got,
        });
    }
    Ok(got)
}

/// Reads one frame and decodes it. `limit` bounds `N`; values above `MAX_FRAME_BYTES` are
/// clamped to it. Returns `Closed` only on a clean end of stream before the first byte.
pub async fn read_frame<T, R>(r: &mut R, limit: u32) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let n = read_len(r, limit.min(MAX_FRAME_BYTES)).await?;
    read_version(r).await?;
    let body = read_body(r, n - VERSION_BYTES).await?;
    decode(&body)
}

/// Reads and checks `N`: the size check happens here, before any body byte is read.
async fn read_len<R: AsyncRead + Unpin>(r: &mut R, limit: u32) -> Result<u32, FrameError> {
    let mut len = [0u8; 4];
    let first = r.read(&mut len).await?;
    if first == 0 {
        return Err(FrameError::Closed);
    }
    read_exact_or_truncated(r, &mut len[first..], "frame header").await?;
    let n = u32::from_be_bytes(len);
    if n > limit {
        return Err(FrameError::Oversized { limit, got: n });
    }
    if n < VERSION_BYTES {
        return Err(FrameError::Malformed(format!(
            "frame length {n} cannot hold the version"
        )));
    }
    Ok(n)
}

async fn read_version<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), FrameError> {
    let mut version = [0u8; 2];
    read_exact_or_truncated(r, &mut version, "frame version").await?;
    let got = u16::from_be_bytes(version);
    if got != PROTOCOL_VERSION {
        return Err(FrameError::Version {
            expected: PROTOCOL_VERSION,
            got,
        });
    }
    Ok(())
}

/// Reads exactly `len` body bytes, growing the buffer only as bytes arrive.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> Result<Vec<u8>, FrameError> {
    let len = len as usize;
    let mut body = Vec::with_capacity(len.min(INITIAL_BODY_CAPACITY));
    let got = r.take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(FrameError::Malformed(format!(
            "truncated body: expected {len} bytes, got {got}"
        )));
    }
    Ok(body)
}

/// `read_exact`, except that the stream ending early is a malformed frame, not an I/O error:
/// the peer sent part of a frame and stopped.
async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &str,
) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(FrameError::Malformed(format!("truncated {what}")))
        }
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Decodes a payload that must be exactly one message.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| FrameError::Malformed(format!("cannot decode: {e}")))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    Ok(msg)
}

/// Encodes `msg` and writes the whole frame.
pub async fn write_frame<T, W>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use std::fmt::Debug;
    use std::io::Cursor;
    use xkd_config::Modality;

    fn plan() -> ShardPlan {
        let mut plan = ShardPlan::shuffled(vec![3, 1, 4, 1, 5], 9);
        plan.cursor = 2;
        plan
    }

    fn join() -> Join {
        Join {
            protocol_version: PROTOCOL_VERSION,
            token: "secret".into(),
            collective_addr: "127.0.0.1:4000".into(),
            hostname: "node-a".into(),
            pid: 42,
        }
    }

    fn step() -> StepReport {
        StepReport {
            task: 1,
            rank: 2,
            step: 3,
            loss: 0.5,
            kl: 0.25,
            ce: 0.125,
            lr: 1e-3,
            grad_norm: 2.0,
            samples_per_s: 100.0,
            tokens_per_s: 3000.0,
            ms_teacher: 1.0,
            ms_student: 2.0,
            ms_loss: 0.5,
            ms_allreduce: 3.0,
            ms_optimizer: 4.0,
        }
    }

    fn train_task(objective: Objective) -> Task {
        Task {
            id: 7,
            kind: TaskKind::Train(Box::new(TrainTask {
                modality: Modality::Audio,
                objective,
                init: Some("a.safetensors".into()),
                save: "b.safetensors".into(),
                keep_saved: false,
                plan: plan(),
                replay: Some(plan()),
                steps: 10,
                batch: 4,
                replay_batch: 2,
                lr: 1e-3,
                weight_decay: 0.01,
                warmup_steps: 2,
                caption_weight: 1.0,
                grad_clip: 1.0,
                seed: 5,
                checkpoint: Some(CheckpointOrder {
                    url: "s3://bucket/prefix".into(),
                    run_id: "run-1".into(),
                    every_steps: 5,
                }),
                resume_from: Some(40),
                teacher_cache: None,
            })),
        }
    }

    fn worker_msgs() -> Vec<WorkerMsg> {
        vec![
            WorkerMsg::Join(join()),
            WorkerMsg::Heartbeat {
                seq: u64::MAX,
                progress: 7,
                waiting: true,
            },
            WorkerMsg::Step(step()),
            WorkerMsg::Saved(SavedCheckpoint {
                task: 3,
                step: 100,
                loss: 0.25,
                objects: vec![SavedObject {
                    name: "student.safetensors".into(),
                    size: 12,
                    sha256: "ab".repeat(32),
                }],
            }),
            WorkerMsg::SaveFailed {
                task: 3,
                step: 200,
                error: "store unreachable".into(),
            },
            WorkerMsg::Done {
                task: 1,
                result: TaskResult::Data(DataSummary {
                    dir: "/tmp/d".into(),
                    classes: vec!["dog".into(), "cat".into()],
                    splits: vec![SplitClips {
                        name: "eval".into(),
                        clips: vec![1, 2],
                        labels: vec![0, 1],
                    }],
                }),
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
            WorkerMsg::Done {
                task: 3,
                result: TaskResult::Evaluated(vec![ClipOutcome {
                    clip: 1,
                    label: 2,
                    predicted: 2,
                    p_true: 0.9,
                    entropy: 0.3,
                }]),
            },
            WorkerMsg::Failed {
                task: 4,
                error: "boom".into(),
                kind: FailureKind::Permanent,
            },
            WorkerMsg::Failed {
                task: 5,
                error: "peer gone".into(),
                kind: FailureKind::Transient,
            },
            WorkerMsg::CollectiveId {
                id: (0..NCCL_UNIQUE_ID_BYTES as u8).collect(),
            },
        ]
    }

    fn coordinator_msgs() -> Vec<CoordinatorMsg> {
        let rejects = [
            Reject::BadToken,
            Reject::VersionMismatch {
                expected: 1,
                got: 2,
            },
            Reject::Malformed { detail: "x".into() },
            Reject::Oversized { limit: 1, got: 2 },
            Reject::NotExpectingWorkers,
        ];
        let mut msgs = vec![
            CoordinatorMsg::Assignment(Assignment {
                run_id: "run".into(),
                rank: 1,
                world_size: 2,
                peers: vec!["a:1".into(), "b:2".into()],
                collective: CollectiveKind::Nccl,
                config_toml: "seed = 1\n".into(),
                config_digest: "d".into(),
                out_dir: "/out".into(),
            }),
            CoordinatorMsg::Task(Task {
                id: 1,
                kind: TaskKind::PrepareData,
            }),
            CoordinatorMsg::Task(train_task(Objective::Supervised)),
            CoordinatorMsg::Task(train_task(Objective::Distill {
                teacher: "t".into(),
                alpha: 0.5,
                temperature: 2.0,
                label_free: true,
                full_vocab: false,
                caption_weight: 1.0,
                replay_labels: true,
                micro_batch: 2,
            })),
            CoordinatorMsg::Task(Task {
                id: 9,
                kind: TaskKind::Evaluate(EvalTask {
                    modality: Modality::Visual,
                    model: "m".into(),
                    plan: plan(),
                    seed: 1,
                }),
            }),
            CoordinatorMsg::Stop { task: 9 },
            CoordinatorMsg::Shutdown {
                reason: "done".into(),
            },
            CoordinatorMsg::Restart {
                reason: "rank 1 lost".into(),
            },
            CoordinatorMsg::CollectiveId {
                id: vec![255; NCCL_UNIQUE_ID_BYTES],
            },
        ];
        msgs.extend(rejects.into_iter().map(CoordinatorMsg::Reject));
        msgs
    }

    async fn round_trip<T>(msgs: Vec<T>)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        // All frames back to back in one stream: the reader must stop exactly at each boundary.
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).await.unwrap();
        }
        let mut r = Cursor::new(wire);
        for m in &msgs {
            let got: T = read_frame(&mut r, MAX_FRAME_BYTES).await.unwrap();
            assert_eq!(&got, m);
        }
        let end = read_frame::<T, _>(&mut r, MAX_FRAME_BYTES).await;
        assert!(matches!(end, Err(FrameError::Closed)), "{end:?}");
    }

    #[tokio::test]
    async fn every_message_round_trips() {
        round_trip(worker_msgs()).await;
        round_trip(coordinator_msgs()).await;
    }

    #[test]
    fn header_carries_length_and_version() {
        let frame = encode(&WorkerMsg::heartbeat(1)).unwrap();
        let n = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(n as usize, frame.len() - 4);
        assert_eq!(u16::from_be_bytes([frame[4], frame[5]]), PROTOCOL_VERSION);
    }

    /// A reader that yields its bytes and then fails the test if anything reads further.
    struct NoMoreReads {
        data: Cursor<Vec<u8>>,
    }

    impl AsyncRead for NoMoreReads {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let len = self.data.get_ref().len() as u64;
            assert!(
                self.data.position() < len,
                "the reader went past the header"
            );
            std::pin::Pin::new(&mut self.data).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn oversized_header_is_rejected_before_the_body() {
        let announced = 100u32 << 20;
        let mut r = NoMoreReads {
            data: Cursor::new(announced.to_be_bytes().to_vec()),
        };
        let got = read_frame::<WorkerMsg, _>(&mut r, MAX_FRAME_BYTES).await;
        match got {
            Err(FrameError::Oversized { limit, got }) => {
                assert_eq!((limit, got), (MAX_FRAME_BYTES, announced));
            }
            other => panic!("expected Oversized, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn caller_limit_applies() {
        let frame = encode(&WorkerMsg::Join(join())).unwrap();
        let got = read_frame::<WorkerMsg, _>(&mut Cursor::new(frame), 8).await;
        assert!(matches!(got, Err(FrameError::Oversized { limit: 8, .. })));
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let big = WorkerMsg::Failed {
            task: 0,
            error: "x".repeat(MAX_FRAME_BYTES as usize),
            kind: FailureKind::Permanent,
        };
        assert!(matches!(encode(&big), Err(FrameError::Oversized { .. })));
    }

    #[tokio::test]
    async fn wrong_version_is_rejected() {
        let mut frame = encode(&WorkerMsg::heartbeat(3)).unwrap();
        frame[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let got = read_frame::<WorkerMsg, _>(&mut Cursor::new(frame), MAX_FRAME_BYTES).await;
        match got {
            Err(FrameError::Version { expected, got }) => {
                assert_eq!((expected, got), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
            }
            other => panic!("expected Version, got {other:?}"),
        }
    }

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32 + 2).to_be_bytes().to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    async fn expect_malformed(wire: Vec<u8>) -> String {
        match read_frame::<WorkerMsg, _>(&mut Cursor::new(wire), MAX_FRAME_BYTES).await {
            Err(FrameError::Malformed(detail)) => detail,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        // Variant index 200 does not exist.
        expect_malformed(raw_frame(&[200, 1, 2, 3])).await;
        // A string claiming far more bytes than the frame holds.
        expect_malformed(raw_frame(&[4, 0, 0xfc, 0xff, 0xff, 0xff, 0x7f])).await;
        // Empty payload, and a length too small for the version.
        expect_malformed(raw_frame(&[])).await;
        expect_malformed(vec![0, 0, 0, 1, 0]).await;
    }

    #[tokio::test]
    async fn trailing_bytes_are_malformed() {
        let mut payload = encode(&WorkerMsg::heartbeat(3)).unwrap()[6..].to_vec();
        payload.push(0);
        let detail = expect_malformed(raw_frame(&payload)).await;
        assert!(detail.contains("trailing"), "{detail}");
    }

    #[tokio::test]
    async fn truncated_frames_are_malformed() {
        let frame = encode(&WorkerMsg::Join(join())).unwrap();
        let detail = expect_malformed(frame[..frame.len() - 3].to_vec()).await;
        assert!(detail.contains("truncated body"), "{detail}");
        expect_malformed(frame[..2].to_vec()).await;
        expect_malformed(frame[..5].to_vec()).await;
    }

    #[tokio::test]
    async fn clean_end_is_closed() {
        let got = read_frame::<WorkerMsg, _>(&mut Cursor::new(Vec::new()), MAX_FRAME_BYTES).await;
        assert!(matches!(got, Err(FrameError::Closed)));
    }
}
