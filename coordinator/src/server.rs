//! Rendezvous and control: the QUIC server workers join, and the cluster of joined workers.
//!
//! Each worker opens one bidirectional stream and sends `WorkerMsg::Join` as its first frame.
//! Every incoming connection is screened in its own task, so a slow or hostile peer never holds
//! up the others; a valid join goes to `gather` over a channel, and its arrival order is its
//! rank. Anything invalid gets a `Reject` frame and a closed connection, and is only logged.
//! Once `gather` has its workers, every newcomer is answered `NotExpectingWorkers` until
//! `reopen` (or the next `gather`); joins that come while the server is open wait for
//! `gather`. `gather` may run again once the previous cluster is gone: that is how a run starts
//! a new generation of workers after losing one.
//!
//! Liveness is frames, not QUIC keep-alives: a joined worker that sends nothing for the
//! heartbeat timeout is lost, even if its connection is technically open.

use anyhow::{anyhow, bail, ensure, Context};
use prometheus_client::metrics::gauge::Gauge;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::AsyncRead;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Mutex;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};
use xkd_protocol::frame::{encode, read_frame, write_frame, FrameError, MAX_FRAME_BYTES};
use xkd_protocol::transport::{
    server_endpoint, Fingerprint, ServerIdentity, CLOSE_LOST, CLOSE_REJECTED,
};
use xkd_protocol::{
    CoordinatorMsg, Join, Reject, WorkerMsg, NCCL_UNIQUE_ID_BYTES, PROTOCOL_VERSION,
};

/// A join is a few hundred bytes; a small limit here keeps unauthenticated peers from making
/// us buffer a full-size frame.
pub const JOIN_FRAME_LIMIT: u32 = 64 << 10;
/// Time a connecting peer gets for the handshake, its stream and its join frame together.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a refused peer gets to receive its `Reject` before the connection is closed.
const REJECT_GRACE: Duration = Duration::from_secs(1);
/// Time each worker gets to acknowledge `Shutdown` before `Cluster::shutdown` returns anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct ControlServer {
    endpoint: Endpoint,
    identity: ServerIdentity,
    local_addr: SocketAddr,
    /// Valid joins, in arrival order, from the acceptor.
    admitted: UnboundedReceiver<Admitted>,
    /// Whether `gather` is taking workers now; otherwise valid joins are refused.
    gathering: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
    /// Joined workers whose connection is watched, over every generation (`count_alive`).
    alive: Gauge,
}

/// One worker that joined.
#[derive(Debug, Clone)]
pub struct Joined {
    pub rank: u32,
    /// The worker's join message, with `token` blanked.
    pub join: Join,
    pub remote: SocketAddr,
}

#[derive(Debug)]
pub enum Event {
    Msg {
        rank: u32,
        msg: WorkerMsg,
    },
    /// Sent once per worker; nothing more comes from that rank.
    Lost {
        rank: u32,
        reason: String,
    },
}

/// The joined workers, in rank order.
pub struct Cluster {
    members: Vec<Joined>,
    links: Vec<Arc<Link>>,
    events: UnboundedReceiver<Event>,
    readers: Vec<JoinHandle<()>>,
    send_timeout: Duration,
    /// Set once the coordinator has told everyone to stop: a worker leaving is then expected.
    stopping: Arc<AtomicBool>,
    /// Workers whose watcher runs (`ControlServer::count_alive`).
    alive: Gauge,
    /// Keeps the endpoint driver alive as long as the cluster, whatever happens to the server.
    _endpoint: Endpoint,
}

/// The sending half of a joined worker's control stream.
struct Link {
    conn: Connection,
    send: Mutex<SendStream>,
}

/// A connection that has opened its control stream, before its verdict.
struct Peer {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    remote: SocketAddr,
}

/// A peer whose join passed every check, waiting for `gather` to give it a rank.
struct Admitted {
    peer: Peer,
    join: Join,
}

impl ControlServer {
    /// Binds QUIC on `listen` with a new self-signed certificate; `token` is the run's join
    /// token.
    pub async fn bind(listen: SocketAddr, token: String) -> anyhow::Result<ControlServer> {
        ControlServer::bind_as(listen, token, ServerIdentity::generate()?).await
    }

    /// Like `bind`, presenting `identity` (a certificate the coordinator was given).
    pub async fn bind_as(
        listen: SocketAddr,
        token: String,
        identity: ServerIdentity,
    ) -> anyhow::Result<ControlServer> {
        let endpoint = server_endpoint(listen, &identity)?;
        let local_addr = endpoint.local_addr().context("reading the bound address")?;
        info!(%local_addr, "control server listening");
        let (admit_tx, admitted) = unbounded_channel();
        // Open from the start: a worker may join as soon as the certificate is written,
        // before `gather` runs.
        let gathering = Arc::new(AtomicBool::new(true));
        let acceptor = tokio::spawn(accept(
            endpoint.clone(),
            token.into(),
            admit_tx,
            gathering.clone(),
        ));
        Ok(ControlServer {
            endpoint,
            identity,
            local_addr,
            admitted,
            gathering,
            acceptor,
            alive: Gauge::default(),
        })
    }

    /// Keeps `gauge` at the number of joined workers whose connection is up (the metrics'
    /// `xkd_workers_alive`): one more on each join, one less when a worker is lost, leaves
    /// or its generation is dropped.
    pub fn count_alive(&mut self, gauge: Gauge) {
        self.alive = gauge;
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The certificate workers must trust (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.identity.cert_der
    }

    /// The SHA-256 of `cert_der`, which a worker may pin instead of holding the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.identity.cert_der)
    }

    /// Takes joins again (they wait for the next `gather`): called before the workers of a new
    /// generation are started, so none that is quick to join is refused.
    pub fn reopen(&self) {
        self.gathering.store(true, Ordering::SeqCst);
    }

    /// Accepts joins until `world` valid workers joined, ranked in join order, or fails when
    /// `timeout` passes first, naming how many joined. Runs again for each generation of
    /// workers; the caller drops the previous cluster first.
    pub async fn gather(
        &mut self,
        world: usize,
        timeout: Duration,
        heartbeat_timeout: Duration,
    ) -> anyhow::Result<Cluster> {
        ensure!(world > 0, "a run needs at least one worker");
        let deadline = Instant::now() + timeout;
        let (events_tx, events_rx) = unbounded_channel();
        let mut cluster = Cluster::new(self.endpoint.clone(), events_rx, heartbeat_timeout);
        cluster.alive = self.alive.clone();
        self.gathering.store(true, Ordering::SeqCst);
        let gathered = loop {
            if cluster.members.len() == world {
                break Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(anyhow!(
                        "timed out after {timeout:?} waiting for workers: {} of {world} joined",
                        cluster.members.len()
                    ));
                }
                admitted = self.admitted.recv() => match admitted {
                    Some(admitted) => cluster.admit(admitted, heartbeat_timeout, events_tx.clone()),
                    None => break Err(anyhow!("the QUIC endpoint closed")),
                },
            }
        };
        self.gathering.store(false, Ordering::SeqCst);
        // Joins that passed screening while the last places were filled.
        while let Ok(late) = self.admitted.try_recv() {
            tokio::spawn(refuse(late.peer, Reject::NotExpectingWorkers));
        }
        gathered.map(|()| cluster)
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Screens every incoming connection in its own task; valid joins go to `gather` while it
/// runs and are refused with `NotExpectingWorkers` otherwise.
async fn accept(
    endpoint: Endpoint,
    token: Arc<str>,
    admit: UnboundedSender<Admitted>,
    gathering: Arc<AtomicBool>,
) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(screen(
            incoming,
            token.clone(),
            admit.clone(),
            gathering.clone(),
        ));
    }
}

/// Handshake, control stream and join frame of one incoming connection, then its verdict.
async fn screen(
    incoming: Incoming,
    token: Arc<str>,
    admit: UnboundedSender<Admitted>,
    gathering: Arc<AtomicBool>,
) {
    let Some(mut peer) = open_peer(incoming).await else {
        return;
    };
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let first = timeout_at(deadline, read_join(&mut peer.recv, &token)).await;
    let verdict = match first {
        Ok(verdict) => verdict,
        Err(_) => Err(Reject::Malformed {
            detail: format!("no join frame within {JOIN_TIMEOUT:?}"),
        }),
    };
    match verdict {
        Ok(join) if gathering.load(Ordering::SeqCst) => {
            if let Err(late) = admit.send(Admitted { peer, join }) {
                refuse(late.0.peer, Reject::NotExpectingWorkers).await;
            }
        }
        // The run has all the workers it needs right now.
        Ok(_) => refuse(peer, Reject::NotExpectingWorkers).await,
        Err(reject) => refuse(peer, reject).await,
    }
}

/// Completes the handshake and accepts the worker's control stream, within `JOIN_TIMEOUT`.
async fn open_peer(incoming: Incoming) -> Option<Peer> {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let conn = match timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            warn!(%remote, error = %e, "QUIC handshake failed");
            return None;
        }
        Err(_) => {
            warn!(%remote, "QUIC handshake timed out");
            return None;
        }
    };
    match timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok((send, recv))) => Some(Peer {
            conn,
            send,
            recv,
            remote,
        }),
        _ => {
            warn!(%remote, "peer opened no control stream");
            conn.close(CLOSE_REJECTED, b"no control stream");
            None
        }
    }
}

/// Reads a connection's first frame from `recv` (at most `JOIN_FRAME_LIMIT`) and checks it
/// against `token`: the join this run accepts (token blanked), or the `Reject` that answers it.
/// This is all an unauthenticated peer's bytes reach; the join fuzzer (`fuzz/`) enters here.
pub async fn read_join<R>(recv: &mut R, token: &str) -> Result<Join, Reject>
where
    R: AsyncRead + Unpin,
{
    check_join(read_frame(recv, JOIN_FRAME_LIMIT).await, token)
}

/// The join in `first`, if it is one this run accepts; otherwise why not.
fn check_join(first: Result<WorkerMsg, FrameError>, token: &str) -> Result<Join, Reject> {
    let join = match first.map_err(reject_for)? {
        WorkerMsg::Join(join) => join,
        _ => {
            return Err(Reject::Malformed {
                detail: "the first frame must be a Join".into(),
            })
        }
    };
    if join.protocol_version != PROTOCOL_VERSION {
        return Err(Reject::VersionMismatch {
            expected: PROTOCOL_VERSION,
            got: join.protocol_version,
        });
    }
    if !same_token(&join.token, token) {
        return Err(Reject::BadToken);
    }
    Ok(Join {
        token: String::new(),
        ..join
    })
}

fn reject_for(error: FrameError) -> Reject {
    match error {
        FrameError::Oversized { limit, got } => Reject::Oversized { limit, got },
        FrameError::Version { expected, got } => Reject::VersionMismatch { expected, got },
        FrameError::Malformed(detail) => Reject::Malformed { detail },
        FrameError::Closed => Reject::Malformed {
            detail: "the stream ended before a join".into(),
        },
        FrameError::Io(e) => Reject::Malformed {
            detail: format!("reading the join: {e}"),
        },
    }
}

/// Compares in time independent of where the tokens differ, so response timing does not leak
/// how much of a guessed token is right. `subtle`'s comparison is vetted against the compiler
/// turning it back into an early exit (which a hand-written fold does not guard against); it
/// answers a length mismatch at once, which leaks only the token's length.
fn same_token(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Sends `reject`, gives the peer a moment to receive it, and closes the connection.
async fn refuse(mut peer: Peer, reject: Reject) {
    warn!(remote = %peer.remote, reason = %reject, "refused a worker");
    // Whatever else the peer is sending (an oversized body, say) is not wanted.
    let _ = peer.recv.stop(CLOSE_REJECTED);
    let reply = CoordinatorMsg::Reject(reject);
    // Closing before the peer acknowledged the frame could discard it.
    let delivered = timeout(REJECT_GRACE, async {
        if write_frame(&mut peer.send, &reply).await.is_ok() {
            finish_acknowledged(&mut peer.send, &peer.conn).await;
        }
    });
    let _ = delivered.await;
    peer.conn.close(CLOSE_REJECTED, b"join refused");
}

/// Ends `send` and resolves once the peer has acknowledged all of it or `conn` is gone: a
/// frame still in the send buffer when the connection closes is lost.
async fn finish_acknowledged(send: &mut SendStream, conn: &Connection) {
    if send.finish().is_err() {
        return; // already finished or reset: nothing more can be delivered
    }
    tokio::select! {
        _ = send.stopped() => {}
        _ = conn.closed() => {}
    }
}

impl Cluster {
    fn new(endpoint: Endpoint, events: UnboundedReceiver<Event>, send_timeout: Duration) -> Self {
        Cluster {
            members: Vec::new(),
            links: Vec::new(),
            events,
            readers: Vec::new(),
            send_timeout,
            stopping: Arc::new(AtomicBool::new(false)),
            alive: Gauge::default(),
            _endpoint: endpoint,
        }
    }

    /// Gives `admitted` the next rank and starts watching what it sends.
    fn admit(
        &mut self,
        admitted: Admitted,
        heartbeat_timeout: Duration,
        events: UnboundedSender<Event>,
    ) {
        let Admitted { peer, join } = admitted;
        let rank = self.members.len() as u32;
        info!(rank, remote = %peer.remote, hostname = %join.hostname, pid = join.pid, "worker joined");
        let watch = watch(
            rank,
            peer.recv,
            peer.conn.clone(),
            heartbeat_timeout,
            events,
            self.stopping.clone(),
            Alive::new(self.alive.clone()),
        );
        self.readers.push(tokio::spawn(watch));
        self.links.push(Arc::new(Link {
            conn: peer.conn,
            send: Mutex::new(peer.send),
        }));
        self.members.push(Joined {
            rank,
            join,
            remote: peer.remote,
        });
    }

    pub fn members(&self) -> &[Joined] {
        &self.members
    }

    /// Sends `msg` to `rank`; fails if the worker is gone or does not take the frame within
    /// the heartbeat timeout.
    pub async fn send(&self, rank: u32, msg: &CoordinatorMsg) -> anyhow::Result<()> {
        let link = self.link(rank)?;
        let frame = encode(msg)?;
        link.write(&frame, self.send_timeout)
            .await
            .with_context(|| format!("sending to rank {rank}"))
    }

    /// Sends `msg` to every rank at once, so one stuck worker does not delay the others;
    /// fails naming every rank that did not take it.
    pub async fn broadcast(&self, msg: &CoordinatorMsg) -> anyhow::Result<()> {
        let frame: Arc<[u8]> = encode(msg)?.into();
        let limit = self.send_timeout;
        let writes = self
            .on_every_link(|link| {
                let frame = frame.clone();
                async move { link.write(&frame, limit).await }
            })
            .await;
        let mut failed = Vec::new();
        for (rank, write) in writes.into_iter().enumerate() {
            match write {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("rank {rank}: {e:#}")),
                Err(e) => failed.push(format!("rank {rank}: {e}")),
            }
        }
        ensure!(failed.is_empty(), "broadcast failed: {}", failed.join("; "));
        Ok(())
    }

    /// Tells every worker to stop; their departures are expected from here on. Returns once
    /// each worker has acknowledged the frame at the transport or has left, or after
    /// `SHUTDOWN_GRACE`: the coordinator's process ends soon after, and a frame still in its
    /// send buffer then would never leave it, so a worker started by someone else (`srun`, a
    /// pod) would wait for an order that never comes.
    pub async fn shutdown(&self, reason: &str) -> anyhow::Result<()> {
        self.stopping.store(true, Ordering::Relaxed);
        let msg = CoordinatorMsg::Shutdown {
            reason: reason.to_string(),
        };
        let sent = self.broadcast(&msg).await;
        let waits = self
            .on_every_link(|link| async move { link.delivered(SHUTDOWN_GRACE).await })
            .await;
        let mut undelivered = Vec::new();
        for (rank, wait) in waits.into_iter().enumerate() {
            if !matches!(wait, Ok(true)) {
                undelivered.push(rank.to_string());
            }
        }
        if !undelivered.is_empty() {
            warn!(
                ranks = undelivered.join(", "),
                "not acknowledged within {SHUTDOWN_GRACE:?}: leaving without them"
            );
        }
        sent
    }

    /// Runs `act` on every link at once, so one stuck worker does not hold up the others;
    /// each rank's outcome in rank order (a task that panicked as its join error).
    async fn on_every_link<F, Fut>(&self, act: F) -> Vec<Result<Fut::Output, JoinError>>
    where
        F: Fn(Arc<Link>) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let tasks: Vec<_> = self
            .links
            .iter()
            .map(|link| tokio::spawn(act(link.clone())))
            .collect();
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await);
        }
        outcomes
    }

    /// Ends this generation: every worker is told to exit for a restart, and their departures
    /// are expected from here on. Best effort: a worker that is gone is already out.
    pub async fn restart(&self, reason: &str) {
        self.stopping.store(true, Ordering::Relaxed);
        let msg = CoordinatorMsg::Restart {
            reason: reason.to_string(),
        };
        if let Err(e) = self.broadcast(&msg).await {
            debug!(
                error = format!("{e:#}"),
                "not every worker heard the restart"
            );
        }
    }

    /// The next message or loss from any worker; `None` once every worker is lost.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The NCCL rendezvous of a generation whose assignments said `CollectiveKind::Nccl`:
    /// waits for rank 0's `CollectiveId` and sends those bytes to every rank, rank 0 included,
    /// so each rank builds its communicator from the same id. Fails (and the caller restarts
    /// the generation or gives up) when rank 0 does not send one within `timeout`, when a
    /// rank is lost or sends anything else first, or when the id has the wrong length:
    /// nothing waits forever on a communicator that cannot form.
    pub async fn hand_off_collective_id(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let id = loop {
            let event = timeout_at(deadline, self.next_event()).await.map_err(|_| {
                anyhow!("rank 0 did not send its NCCL unique id within {timeout:?}")
            })?;
            match event {
                Some(Event::Msg {
                    rank: 0,
                    msg: WorkerMsg::CollectiveId { id },
                }) => break id,
                Some(Event::Msg {
                    msg: WorkerMsg::Heartbeat { .. },
                    ..
                }) => continue,
                Some(Event::Msg {
                    rank,
                    msg: WorkerMsg::Failed { error, .. },
                }) => bail!("rank {rank} failed before the NCCL communicator formed: {error}"),
                Some(Event::Msg { rank, msg }) => bail!(
                    "rank {rank} sent {} while the coordinator waited for rank 0's NCCL unique id",
                    msg_name(&msg)
                ),
                Some(Event::Lost { rank, reason }) => {
                    bail!("rank {rank} was lost before the NCCL unique id was handed on: {reason}")
                }
                None => bail!("every worker was lost before the NCCL unique id was handed on"),
            }
        };
        ensure!(
            id.len() == NCCL_UNIQUE_ID_BYTES,
            "rank 0 sent an NCCL unique id of {} bytes; NCCL's is {NCCL_UNIQUE_ID_BYTES}",
            id.len()
        );
        debug!(
            bytes = id.len(),
            "handing rank 0's NCCL unique id to every rank"
        );
        self.broadcast(&CoordinatorMsg::CollectiveId { id }).await
    }

    fn link(&self, rank: u32) -> anyhow::Result<&Arc<Link>> {
        self.links
            .get(rank as usize)
            .ok_or_else(|| anyhow!("no rank {rank} in a world of {}", self.links.len()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
        // A cluster dropped without a shutdown (a failed generation) lets its workers go; after
        // a shutdown they leave on their own, and closing here could cut that frame off.
        if !self.stopping.load(Ordering::Relaxed) {
            for link in &self.links {
                link.conn.close(CLOSE_LOST, b"generation over");
            }
        }
    }
}

impl Link {
    async fn write(&self, frame: &[u8], limit: Duration) -> anyhow::Result<()> {
        if let Some(reason) = self.conn.close_reason() {
            bail!("connection closed: {reason}");
        }
        let mut send = self.send.lock().await;
        timeout(limit, send.write_all(frame))
            .await
            .map_err(|_| anyhow!("the worker took no frame for {limit:?}"))??;
        Ok(())
    }

    /// Ends the stream and waits, at most `limit`, until the worker has acknowledged all of
    /// it or its connection is gone; false when `limit` passed first.
    async fn delivered(&self, limit: Duration) -> bool {
        let mut send = self.send.lock().await;
        timeout(limit, finish_acknowledged(&mut send, &self.conn))
            .await
            .is_ok()
    }
}

/// Forwards what `rank` sends until it goes silent for `heartbeat_timeout`, breaks the
/// protocol, or disconnects; then closes its connection and reports it lost, once.
/// A message's variant name, for errors that must not print a whole task result.
fn msg_name(msg: &WorkerMsg) -> &'static str {
    match msg {
        WorkerMsg::Join(_) => "Join",
        WorkerMsg::Heartbeat { .. } => "Heartbeat",
        WorkerMsg::Step(_) => "Step",
        WorkerMsg::Saved(_) => "Saved",
        WorkerMsg::SaveFailed { .. } => "SaveFailed",
        WorkerMsg::Done { .. } => "Done",
        WorkerMsg::Failed { .. } => "Failed",
        WorkerMsg::CollectiveId { .. } => "CollectiveId",
    }
}

async fn watch(
    rank: u32,
    mut recv: RecvStream,
    conn: Connection,
    heartbeat_timeout: Duration,
    events: UnboundedSender<Event>,
    stopping: Arc<AtomicBool>,
    alive: Alive,
) {
    let reason = loop {
        let frame = timeout(heartbeat_timeout, read_frame(&mut recv, MAX_FRAME_BYTES)).await;
        let msg = match frame {
            Err(_) => break format!("no frame for {heartbeat_timeout:?}"),
            Ok(Err(FrameError::Closed)) => break "closed its control stream".to_string(),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(WorkerMsg::Join(_))) => break "sent a second Join".to_string(),
            Ok(Ok(msg)) => msg,
        };
        if events.send(Event::Msg { rank, msg }).is_err() {
            return; // the cluster is gone; nobody is listening
        }
    };
    if stopping.load(Ordering::Relaxed) {
        debug!(rank, %reason, "worker left after shutdown");
    } else {
        warn!(rank, %reason, "worker lost");
    }
    conn.close(CLOSE_LOST, b"lost");
    // Counted out before the loss is reported, so whoever hears of it sees the gauge agree.
    drop(alive);
    let _ = events.send(Event::Lost { rank, reason });
}

/// One worker counted alive for as long as its watcher lives: the watcher ending (the worker
/// lost or gone) or being aborted (its cluster dropped) counts it out.
struct Alive(Gauge);

impl Alive {
    fn new(gauge: Gauge) -> Alive {
        gauge.inc();
        Alive(gauge)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(token: &str, version: u16) -> Join {
        Join {
            protocol_version: version,
            token: token.into(),
            collective_addr: "127.0.0.1:1".into(),
            hostname: "h".into(),
            pid: 1,
        }
    }

    #[test]
    fn good_join_is_admitted_with_token_blanked() {
        let got = check_join(Ok(WorkerMsg::Join(join("t0k", PROTOCOL_VERSION))), "t0k").unwrap();
        assert_eq!(got.token, "");
        assert_eq!(got.hostname, "h");
    }

    #[test]
    fn token_comparison_takes_only_the_same_token() {
        assert!(same_token("t0k", "t0k"));
        assert!(same_token("", ""));
        for wrong in ["t0K", "t0", "t0kx", "", "x0k", "t0k\0"] {
            assert!(!same_token(wrong, "t0k"), "{wrong:?} was taken for t0k");
        }
    }

    #[test]
    fn bad_joins_are_named() {
        let bad_token = check_join(Ok(WorkerMsg::Join(join("nope", PROTOCOL_VERSION))), "t0k");
        assert_eq!(bad_token, Err(Reject::BadToken));
        let prefix = check_join(Ok(WorkerMsg::Join(join("t0", PROTOCOL_VERSION))), "t0k");
        assert_eq!(prefix, Err(Reject::BadToken));
        let longer = check_join(Ok(WorkerMsg::Join(join("t0kk", PROTOCOL_VERSION))), "t0k");
        assert_eq!(longer, Err(Reject::BadToken));
        let empty = check_join(Ok(WorkerMsg::Join(join("", PROTOCOL_VERSION))), "t0k");
        assert_eq!(empty, Err(Reject::BadToken));
        let old = check_join(Ok(WorkerMsg::Join(join("t0k", 0))), "t0k");
        assert!(matches!(old, Err(Reject::VersionMismatch { got: 0, .. })));
        let not_join = check_join(Ok(WorkerMsg::heartbeat(0)), "t0k");
        assert!(matches!(not_join, Err(Reject::Malformed { .. })));
    }

    /// `read_join` reads the first frame under the join limit, not the full frame limit.
    #[tokio::test]
    async fn read_join_reads_the_first_frame_under_the_join_limit() {
        let good = encode(&WorkerMsg::Join(join("t0k", PROTOCOL_VERSION))).unwrap();
        let got = read_join(&mut std::io::Cursor::new(good), "t0k").await;
        assert_eq!(got.unwrap().hostname, "h");
        let big = (JOIN_FRAME_LIMIT + 1).to_be_bytes();
        let got = read_join(&mut &big[..], "t0k").await;
        assert_eq!(
            got,
            Err(Reject::Oversized {
                limit: JOIN_FRAME_LIMIT,
                got: JOIN_FRAME_LIMIT + 1
            })
        );
        let empty = read_join(&mut &[][..], "t0k").await;
        assert!(matches!(empty, Err(Reject::Malformed { .. })), "{empty:?}");
    }
}
