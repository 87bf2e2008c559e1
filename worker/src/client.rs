//! The worker's end of the control plane: join the coordinator, then exchange frames on the one
//! bidirectional stream the join opened.
//!
//! Outgoing messages go through an unbounded channel to a writer task, so any thread (a
//! blocking training loop included) can report without touching the async stream.

use crate::progress::Progress;
use anyhow::{anyhow, bail, Context};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::warn;
use xkd_protocol::frame::{read_frame, write_frame, FrameError, MAX_FRAME_BYTES};
use xkd_protocol::transport::{client_endpoint_for, Trust, CLOSE_NORMAL, SERVER_NAME};
use xkd_protocol::{Assignment, CoordinatorMsg, Join, WorkerMsg};

/// How long the coordinator gets to answer a join (it answers once the whole world joined).
pub const JOIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The joined worker's control connection.
pub struct ControlLink {
    recv: RecvStream,
    conn: Connection,
    sender: LinkSender,
    writer: JoinHandle<()>,
    /// The endpoint drives the connection; it must live as long as the link.
    endpoint: Endpoint,
}

/// Queues messages for the coordinator; cheap to clone, never blocks.
#[derive(Clone)]
pub struct LinkSender {
    tx: UnboundedSender<Outgoing>,
}

/// What the writer task takes: a message, or the order to end the stream once everything
/// queued before it is written and acknowledged.
enum Outgoing {
    Msg(WorkerMsg),
    Finish(tokio::sync::oneshot::Sender<()>),
}

/// Connects to a coordinator that `trust` recognises, sends `join`, and waits for the
/// answer: an `Assignment` is a successful join, a `Reject` an error naming why.
pub async fn join(
    coordinator: SocketAddr,
    trust: &Trust,
    join: Join,
) -> anyhow::Result<(Assignment, ControlLink)> {
    let endpoint = client_endpoint_for(coordinator, trust)?;
    let conn = endpoint
        .connect(coordinator, SERVER_NAME)?
        .await
        .with_context(|| format!("connecting to the coordinator at {coordinator}"))?;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    write_frame(&mut send, &WorkerMsg::Join(join))
        .await
        .context("sending the join")?;
    let answer = tokio::time::timeout(JOIN_ANSWER_TIMEOUT, read_frame(&mut recv, MAX_FRAME_BYTES))
        .await
        .map_err(|_| {
            anyhow!("the coordinator did not answer the join within {JOIN_ANSWER_TIMEOUT:?}")
        })?;
    let assignment = match answer.context("reading the coordinator's answer")? {
        CoordinatorMsg::Assignment(a) => a,
        CoordinatorMsg::Reject(reject) => {
            conn.close(CLOSE_NORMAL, b"rejected");
            bail!("the coordinator rejected the join: {reject}");
        }
        other => bail!("expected an assignment, the coordinator sent {other:?}"),
    };
    Ok((assignment, ControlLink::new(endpoint, conn, send, recv)))
}

impl ControlLink {
    fn new(endpoint: Endpoint, conn: Connection, send: SendStream, recv: RecvStream) -> Self {
        let (tx, rx) = unbounded_channel();
        ControlLink {
            recv,
            conn,
            sender: LinkSender { tx },
            writer: tokio::spawn(write_queued(send, rx)),
            endpoint,
        }
    }

    pub fn sender(&self) -> LinkSender {
        self.sender.clone()
    }

    /// Ends the control stream after everything queued so far, and waits (at most `limit`)
    /// until the coordinator has acknowledged it: what a worker does before it exits on its
    /// own, so its last report is not lost with the process.
    pub async fn finish(&self, limit: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.sender.tx.send(Outgoing::Finish(tx)).is_ok()
            && tokio::time::timeout(limit, rx).await.is_err()
        {
            warn!("the coordinator did not acknowledge the last messages within {limit:?}");
        }
    }

    /// Closes the connection and waits (at most `limit`) until the close has gone out: what a
    /// worker does last before its process ends. The packet that carries the close also
    /// acknowledges what the coordinator sent last (its `Shutdown`), which the coordinator
    /// waits for; a process that ended first would leave it waiting for its grace period.
    pub async fn close(&self, limit: Duration) {
        self.writer.abort();
        self.conn.close(CLOSE_NORMAL, b"worker done");
        let _ = tokio::time::timeout(limit, self.endpoint.wait_idle()).await;
    }

    /// The next order; `None` when the coordinator ended the stream or closed the connection
    /// normally. Losing the connection otherwise (declared lost, timeout) is an error.
    pub async fn recv(&mut self) -> anyhow::Result<Option<CoordinatorMsg>> {
        match read_frame(&mut self.recv, MAX_FRAME_BYTES).await {
            Ok(msg) => Ok(Some(msg)),
            Err(FrameError::Closed) => Ok(None),
            Err(e) => self.ended(e),
        }
    }

    /// This rank's part of the NCCL rendezvous (`CollectiveKind::Nccl`): rank 0 sends the id
    /// `make_id` creates; every rank, rank 0 included, then takes the coordinator's copy, so
    /// all of them build their communicator from the bytes that crossed the wire.
    pub async fn collective_id(
        &mut self,
        rank: u32,
        make_id: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<Vec<u8>> {
        if rank == 0 {
            let id = make_id().context("creating the NCCL unique id")?;
            self.sender.send(WorkerMsg::CollectiveId { id })?;
        }
        match self.recv().await? {
            Some(CoordinatorMsg::CollectiveId { id }) => Ok(id),
            Some(CoordinatorMsg::Shutdown { reason } | CoordinatorMsg::Restart { reason }) => {
                bail!("the coordinator ended this generation before NCCL formed: {reason}")
            }
            Some(other) => bail!("expected rank 0's NCCL unique id, got {other:?}"),
            None => bail!("the coordinator closed the link before handing on the NCCL unique id"),
        }
    }

    /// Tells a normal close by the coordinator from a failure.
    fn ended(&self, error: FrameError) -> anyhow::Result<Option<CoordinatorMsg>> {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == CLOSE_NORMAL => {
                Ok(None)
            }
            Some(reason) => Err(anyhow!("control connection ended: {reason}")),
            None => Err(error).context("reading from the coordinator"),
        }
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        // Stops the writer, which makes every `LinkSender` (and heartbeat task) fail and end.
        self.writer.abort();
        self.conn.close(CLOSE_NORMAL, b"worker done");
    }
}

/// Writes queued messages in order until the queue closes, a `Finish` comes, or the stream
/// fails.
async fn write_queued(mut send: SendStream, mut queue: UnboundedReceiver<Outgoing>) {
    while let Some(item) = queue.recv().await {
        match item {
            Outgoing::Msg(msg) => {
                if let Err(e) = write_frame(&mut send, &msg).await {
                    warn!(error = %e, "control link write failed; dropping further messages");
                    return;
                }
            }
            Outgoing::Finish(done) => {
                if send.finish().is_ok() {
                    let _ = send.stopped().await;
                }
                let _ = done.send(());
                return;
            }
        }
    }
    let _ = send.finish();
}

impl LinkSender {
    /// Queues `msg`; fails only once the link is closed.
    pub fn send(&self, msg: WorkerMsg) -> anyhow::Result<()> {
        self.tx
            .send(Outgoing::Msg(msg))
            .map_err(|_| anyhow!("the control link is closed"))
    }
}

/// Sends `Heartbeat` every `every`, numbered from 0, with the compute thread's `progress`,
/// until the link closes.
pub fn spawn_heartbeat(
    sender: LinkSender,
    every: Duration,
    progress: Arc<Progress>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        // After a stall, beat once rather than in a burst.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for seq in 0u64.. {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = sender.tx.closed() => return,
            }
            let (done, waiting) = progress.read();
            let beat = WorkerMsg::Heartbeat {
                seq,
                progress: done,
                waiting,
            };
            if sender.send(beat).is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn heartbeat_stops_when_the_link_closes() {
        let (tx, mut rx) = unbounded_channel();
        let progress = Arc::new(Progress::default());
        progress.tick();
        let beat = spawn_heartbeat(LinkSender { tx }, Duration::from_millis(5), progress);
        for seq in 0..3 {
            match rx.recv().await {
                Some(Outgoing::Msg(WorkerMsg::Heartbeat {
                    seq: got,
                    progress: 1,
                    waiting: false,
                })) => assert_eq!(got, seq),
                Some(Outgoing::Msg(other)) => panic!("expected heartbeat {seq}, got {other:?}"),
                other => panic!("expected heartbeat {seq}, got {}", other.is_some()),
            }
        }
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), beat)
            .await
            .expect("the heartbeat task outlived its link")
            .unwrap();
    }
}

#[cfg(test)]
mod wire_tests {
    //! `join` and the link against a minimal coordinator built from the protocol crate.
    use super::*;
    use std::net::Ipv4Addr;
    use xkd_protocol::transport::{server_endpoint, ServerIdentity};
    use xkd_protocol::{Reject, PROTOCOL_VERSION};

    fn join_msg() -> Join {
        Join {
            protocol_version: PROTOCOL_VERSION,
            token: "t".into(),
            collective_addr: "127.0.0.1:1".into(),
            hostname: "h".into(),
            pid: 1,
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            run_id: "r".into(),
            rank: 0,
            world_size: 1,
            peers: vec!["127.0.0.1:1".into()],
            collective: xkd_protocol::CollectiveKind::TcpRing,
            config_toml: String::new(),
            config_digest: String::new(),
            out_dir: "/tmp".into(),
        }
    }

    /// Accepts one worker, answers its join with `answer`, then echoes the first message it
    /// sends back as a Shutdown reason and closes normally (or with `CLOSE_REJECTED`).
    async fn coordinator(server: Endpoint, answer: CoordinatorMsg) {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let first: WorkerMsg = read_frame(&mut recv, MAX_FRAME_BYTES).await.unwrap();
        assert_eq!(first, WorkerMsg::Join(join_msg()));
        let rejected = matches!(answer, CoordinatorMsg::Reject(_));
        write_frame(&mut send, &answer).await.unwrap();
        if rejected {
            send.finish().unwrap();
            conn.closed().await;
            return;
        }
        let next: WorkerMsg = read_frame(&mut recv, MAX_FRAME_BYTES).await.unwrap();
        let reason = format!("{next:?}");
        write_frame(&mut send, &CoordinatorMsg::Shutdown { reason })
            .await
            .unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        conn.close(CLOSE_NORMAL, b"bye");
    }

    fn start(answer: CoordinatorMsg) -> (SocketAddr, Trust, JoinHandle<()>) {
        let id = ServerIdentity::generate().unwrap();
        let server = server_endpoint(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), &id).unwrap();
        let addr = server.local_addr().unwrap();
        (
            addr,
            Trust::Certificate(id.cert_der.clone()),
            tokio::spawn(coordinator(server, answer)),
        )
    }

    #[tokio::test]
    async fn join_then_talk_then_normal_close() {
        let test = async {
            let (addr, cert, server) = start(CoordinatorMsg::Assignment(assignment()));
            let (got, mut link) = join(addr, &cert, join_msg()).await.unwrap();
            assert_eq!(got, assignment());
            link.sender().send(WorkerMsg::heartbeat(9)).unwrap();
            match link.recv().await.unwrap() {
                Some(CoordinatorMsg::Shutdown { reason }) => assert!(reason.contains("seq: 9")),
                other => panic!("expected the echo, got {other:?}"),
            }
            assert!(link.recv().await.unwrap().is_none());
            server.await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(20), test)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn reject_is_an_error_naming_the_reason() {
        let test = async {
            let (addr, cert, server) = start(CoordinatorMsg::Reject(Reject::BadToken));
            let error = join(addr, &cert, join_msg())
                .await
                .err()
                .expect("join must fail");
            assert!(format!("{error:#}").contains("join token"), "{error:#}");
            server.await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(20), test)
            .await
            .unwrap();
    }
}
