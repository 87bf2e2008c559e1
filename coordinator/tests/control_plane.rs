//! The control server over real QUIC on loopback: refusals, rendezvous, and loss detection.
//!
//! The clients here speak the wire protocol directly through `xkd_protocol::{frame, transport}`
//! (the coordinator cannot depend on the worker crate), which also lets them misbehave.

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::time::{timeout, Instant};
use xkd_coordinator::server::{Cluster, ControlServer, Event, JOIN_TIMEOUT};
use xkd_protocol::frame::{encode, read_frame, write_frame, MAX_FRAME_BYTES};
use xkd_protocol::transport::{client_endpoint, Trust, CLOSE_LOST, CLOSE_REJECTED, SERVER_NAME};
use xkd_protocol::{
    Assignment, CollectiveKind, CoordinatorMsg, Join, Reject, WorkerMsg, NCCL_UNIQUE_ID_BYTES,
    PROTOCOL_VERSION,
};

const TOKEN: &str = "s3cret-join-token";
/// Upper bound for any one test: a bug fails the test instead of hanging it.
const TEST_LIMIT: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(f: F) -> F::Output {
    timeout(TEST_LIMIT, f).await.expect("test timed out")
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn join_msg(token: &str, version: u16) -> WorkerMsg {
    WorkerMsg::Join(Join {
        protocol_version: version,
        token: token.into(),
        collective_addr: "127.0.0.1:7000".into(),
        hostname: "test-host".into(),
        pid: 1234,
    })
}

/// A hand-driven worker: one connection, one control stream.
struct Client {
    _endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl Client {
    async fn connect(addr: SocketAddr, cert: &[u8]) -> Client {
        let endpoint = client_endpoint(&Trust::Certificate(cert.to_vec())).unwrap();
        let conn = endpoint.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Client {
            _endpoint: endpoint,
            conn,
            send,
            recv,
        }
    }

    async fn joined(addr: SocketAddr, cert: &[u8]) -> Client {
        let mut c = Client::connect(addr, cert).await;
        c.send_msg(&join_msg(TOKEN, PROTOCOL_VERSION)).await;
        c
    }

    async fn send_msg(&mut self, msg: &WorkerMsg) {
        write_frame(&mut self.send, msg).await.unwrap();
    }

    async fn recv_msg(&mut self) -> CoordinatorMsg {
        read_frame(&mut self.recv, MAX_FRAME_BYTES).await.unwrap()
    }

    /// Sends raw bytes, reads the answer: it must be a Reject, and the server must then close
    /// the connection with the rejection code.
    async fn rejected_after(mut self, bytes: &[u8]) -> Reject {
        self.send.write_all(bytes).await.unwrap();
        let reject = match self.recv_msg().await {
            CoordinatorMsg::Reject(r) => r,
            other => panic!("expected a Reject, got {other:?}"),
        };
        self.expect_closed_with(CLOSE_REJECTED).await;
        reject
    }

    async fn expect_closed_with(&self, code: quinn::VarInt) {
        match self.conn.closed().await {
            ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code, code),
            other => panic!("expected an application close, got {other}"),
        }
    }
}

async fn rejection(addr: SocketAddr, cert: &[u8], bytes: &[u8]) -> Reject {
    Client::connect(addr, cert)
        .await
        .rejected_after(bytes)
        .await
}

fn assignment() -> CoordinatorMsg {
    CoordinatorMsg::Assignment(Assignment {
        run_id: "run-1".into(),
        rank: 0,
        world_size: 1,
        peers: vec!["127.0.0.1:7000".into()],
        collective: CollectiveKind::TcpRing,
        config_toml: "seed = 7\n".into(),
        config_digest: "abc".into(),
        out_dir: "/tmp/out".into(),
    })
}

/// Starts `gather(world, ..)` in the background; returns the address, the certificate and
/// the pending gather.
async fn gathering(
    world: usize,
    join_timeout: Duration,
    heartbeat_timeout: Duration,
) -> (
    SocketAddr,
    Vec<u8>,
    tokio::task::JoinHandle<(ControlServer, anyhow::Result<Cluster>)>,
) {
    let mut server = ControlServer::bind(loopback(), TOKEN.into()).await.unwrap();
    let (addr, cert) = (server.local_addr(), server.cert_der().to_vec());
    let task = tokio::spawn(async move {
        let cluster = server.gather(world, join_timeout, heartbeat_timeout).await;
        (server, cluster)
    });
    (addr, cert, task)
}

#[tokio::test]
async fn bad_joins_are_refused_then_a_good_worker_joins() {
    bounded(async {
        let (addr, cert, gather) =
            gathering(1, Duration::from_secs(15), Duration::from_secs(10)).await;

        // (a) wrong token
        let frame = encode(&join_msg("wrong-token", PROTOCOL_VERSION)).unwrap();
        assert_eq!(rejection(addr, &cert, &frame).await, Reject::BadToken);

        // (b) a Join that declares another protocol version
        let frame = encode(&join_msg(TOKEN, PROTOCOL_VERSION + 1)).unwrap();
        let expected = Reject::VersionMismatch {
            expected: PROTOCOL_VERSION,
            got: PROTOCOL_VERSION + 1,
        };
        assert_eq!(rejection(addr, &cert, &frame).await, expected);

        // (c) a frame header with another version (the payload itself is a good Join)
        let mut frame = encode(&join_msg(TOKEN, PROTOCOL_VERSION)).unwrap();
        frame[4..6].copy_from_slice(&99u16.to_be_bytes());
        let expected = Reject::VersionMismatch {
            expected: PROTOCOL_VERSION,
            got: 99,
        };
        assert_eq!(rejection(addr, &cert, &frame).await, expected);

        // (d) a well-sized frame whose payload is garbage (message variant 200)
        let mut garbage = 6u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        garbage.extend_from_slice(&[200, 1, 2, 3]);
        let got = rejection(addr, &cert, &garbage).await;
        assert!(matches!(got, Reject::Malformed { .. }), "{got:?}");

        // (e) a header announcing 100 MiB and no body: refused at once, not after the join
        // timeout the server would otherwise wait for the missing bytes.
        let started = Instant::now();
        let announced = 100u32 << 20;
        let got = rejection(addr, &cert, &announced.to_be_bytes()).await;
        assert!(
            matches!(got, Reject::Oversized { got, limit } if got == announced && limit < got),
            "{got:?}"
        );
        assert!(
            started.elapsed() < JOIN_TIMEOUT / 2,
            "the server waited for the body"
        );

        // None of that stopped the server: (f) a good worker joins with rank 0.
        let mut worker = Client::joined(addr, &cert).await;
        let (mut server, cluster) = gather.await.unwrap();
        let cluster = cluster.unwrap();
        let members = cluster.members();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].rank, 0);
        assert_eq!(members[0].join.hostname, "test-host");
        assert_eq!(members[0].join.token, "", "the token must not be kept");
        assert!(members[0].remote.ip().is_loopback());

        cluster.send(0, &assignment()).await.unwrap();
        assert_eq!(worker.recv_msg().await, assignment());

        // The run is full: a newcomer, even a valid one, is told so.
        let frame = encode(&join_msg(TOKEN, PROTOCOL_VERSION)).unwrap();
        assert_eq!(
            rejection(addr, &cert, &frame).await,
            Reject::NotExpectingWorkers
        );
        assert!(server
            .gather(1, Duration::from_millis(10), Duration::from_secs(1))
            .await
            .is_err());
    })
    .await;
}

#[tokio::test]
async fn a_new_generation_gathers_once_the_last_one_is_gone() {
    bounded(async {
        let (addr, cert, gather) =
            gathering(1, Duration::from_secs(10), Duration::from_secs(10)).await;
        let mut first = Client::joined(addr, &cert).await;
        let (mut server, cluster) = gather.await.unwrap();
        let cluster = cluster.unwrap();
        cluster.restart("rank 1 lost").await;
        let restart = CoordinatorMsg::Restart {
            reason: "rank 1 lost".into(),
        };
        assert_eq!(first.recv_msg().await, restart);
        drop(cluster);
        // Between generations nobody is taken.
        let frame = encode(&join_msg(TOKEN, PROTOCOL_VERSION)).unwrap();
        assert_eq!(
            rejection(addr, &cert, &frame).await,
            Reject::NotExpectingWorkers
        );
        let next = tokio::spawn(async move {
            let cluster = server
                .gather(1, Duration::from_secs(10), Duration::from_secs(10))
                .await;
            (server, cluster)
        });
        let mut second = Client::joined(addr, &cert).await;
        let (_server, cluster) = next.await.unwrap();
        let cluster = cluster.unwrap();
        assert_eq!(cluster.members().len(), 1);
        assert_eq!(cluster.members()[0].rank, 0);
        cluster.send(0, &assignment()).await.unwrap();
        assert_eq!(second.recv_msg().await, assignment());
    })
    .await;
}

#[tokio::test]
async fn ranks_follow_join_order_and_broadcast_reaches_all() {
    bounded(async {
        let (addr, cert, gather) =
            gathering(2, Duration::from_secs(10), Duration::from_secs(10)).await;
        let mut a = Client::joined(addr, &cert).await;
        let mut b = Client::joined(addr, &cert).await;
        let (_server, cluster) = gather.await.unwrap();
        let cluster = cluster.unwrap();
        let ranks: Vec<u32> = cluster.members().iter().map(|m| m.rank).collect();
        assert_eq!(ranks, vec![0, 1]);
        let shutdown = CoordinatorMsg::Shutdown {
            reason: "done".into(),
        };
        cluster.broadcast(&shutdown).await.unwrap();
        assert_eq!(a.recv_msg().await, shutdown);
        assert_eq!(b.recv_msg().await, shutdown);
        assert!(cluster.send(2, &shutdown).await.is_err());
    })
    .await;
}

/// `shutdown` returns only once the worker's transport has the frame: the coordinator's
/// process may end right after, and a frame left in its send buffer would never leave. The
/// worker's runtime is held still (no acknowledgement can go out) while the coordinator shuts
/// down; `shutdown` must not return before it is let go, and the worker must get the frame
/// even though the coordinator's runtime is gone by the time it reads.
#[test]
fn shutdown_returns_once_the_worker_has_the_frame() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let coordinator = runtime();
    let (server, addr, cert) = coordinator.block_on(async {
        let server = ControlServer::bind(loopback(), TOKEN.into()).await.unwrap();
        let (addr, cert) = (server.local_addr(), server.cert_der().to_vec());
        (server, addr, cert)
    });
    let (gathered_tx, gathered) = tokio::sync::oneshot::channel::<()>();
    let (still_tx, still) = mpsc::channel();
    let let_go = Arc::new(AtomicBool::new(false));
    let worker = std::thread::spawn({
        let let_go = let_go.clone();
        move || {
            let rt = runtime();
            let mut client = rt.block_on(async {
                let client = Client::joined(addr, &cert).await;
                gathered.await.unwrap();
                client
            });
            // Outside `block_on` this runtime polls nothing: packets wait in the socket.
            still_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let_go.store(true, Ordering::SeqCst);
            rt.block_on(bounded(client.recv_msg()))
        }
    });
    let mut server = server;
    let cluster = coordinator.block_on(async {
        let cluster = server.gather(1, Duration::from_secs(10), Duration::from_secs(10));
        bounded(cluster).await.unwrap()
    });
    gathered_tx.send(()).unwrap();
    still.recv().unwrap();
    coordinator
        .block_on(bounded(cluster.shutdown("run finished")))
        .unwrap();
    assert!(
        let_go.load(Ordering::SeqCst),
        "shutdown returned before the worker could have acknowledged the frame"
    );
    // What the coordinator's process does next: stop, with nothing left to drive its sockets.
    drop(coordinator);
    let got = worker.join().unwrap();
    assert_eq!(
        got,
        CoordinatorMsg::Shutdown {
            reason: "run finished".into()
        }
    );
    drop((cluster, server));
}

#[tokio::test]
async fn gather_times_out_naming_how_many_joined() {
    bounded(async {
        let (addr, cert, gather) =
            gathering(2, Duration::from_secs(3), Duration::from_secs(10)).await;
        let _only = Client::joined(addr, &cert).await;
        let (_server, cluster) = gather.await.unwrap();
        let error = format!("{:#}", cluster.err().expect("gather should time out"));
        assert!(error.contains("1 of 2"), "{error}");
    })
    .await;
}

/// Joins one worker to a fresh server with the given heartbeat timeout.
async fn one_worker(heartbeat_timeout: Duration) -> (ControlServer, Cluster, Client) {
    let (addr, cert, gather) = gathering(1, Duration::from_secs(10), heartbeat_timeout).await;
    let worker = Client::joined(addr, &cert).await;
    let (server, cluster) = gather.await.unwrap();
    (server, cluster.unwrap(), worker)
}

#[tokio::test]
async fn silent_worker_is_lost_within_the_heartbeat_timeout() {
    bounded(async {
        // A beat every 100 ms against a 1 s timeout: a loaded machine may delay a beat by
        // several hundred ms without the worker being lost.
        let heartbeat_timeout = Duration::from_millis(1000);
        let (_server, mut cluster, mut worker) = one_worker(heartbeat_timeout).await;

        // Beating every 100 ms for well over the timeout keeps the worker in.
        for seq in 0..15 {
            worker.send_msg(&WorkerMsg::heartbeat(seq)).await;
            match cluster.next_event().await {
                Some(Event::Msg { rank: 0, msg }) => {
                    assert_eq!(msg, WorkerMsg::heartbeat(seq))
                }
                other => panic!("expected heartbeat {seq}, got {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Then silence: lost once, within the timeout (plus scheduling slack).
        let silent_since = Instant::now();
        match timeout(Duration::from_secs(10), cluster.next_event()).await {
            Ok(Some(Event::Lost { rank: 0, reason })) => {
                assert!(reason.contains("no frame"), "{reason}")
            }
            other => panic!("expected rank 0 lost, got {other:?}"),
        }
        let waited = silent_since.elapsed();
        assert!(
            waited >= Duration::from_millis(500),
            "lost too early: {waited:?}"
        );
        worker.expect_closed_with(CLOSE_LOST).await;
        assert!(cluster.next_event().await.is_none(), "lost must come once");
    })
    .await;
}

#[tokio::test]
async fn dropped_connection_is_lost() {
    bounded(async {
        // A heartbeat timeout far beyond the test limit: only the drop can cause the loss.
        let (_server, mut cluster, worker) = one_worker(Duration::from_secs(60)).await;
        worker.conn.close(0u32.into(), b"bye");
        match cluster.next_event().await {
            Some(Event::Lost { rank: 0, .. }) => {}
            other => panic!("expected rank 0 lost, got {other:?}"),
        }
        assert!(cluster.next_event().await.is_none());
        assert!(cluster.send(0, &assignment()).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn malformed_frame_after_joining_is_lost() {
    bounded(async {
        let (_server, mut cluster, mut worker) = one_worker(Duration::from_secs(60)).await;
        // A well-framed body of the current version that is no message.
        let [v0, v1] = xkd_protocol::PROTOCOL_VERSION.to_be_bytes();
        worker
            .send
            .write_all(&[0, 0, 0, 3, v0, v1, 250])
            .await
            .unwrap();
        match cluster.next_event().await {
            Some(Event::Lost { rank: 0, reason }) => {
                assert!(reason.contains("malformed"), "{reason}")
            }
            other => panic!("expected rank 0 lost, got {other:?}"),
        }
        worker.expect_closed_with(CLOSE_LOST).await;
    })
    .await;
}

/// Joins `world` workers; returns the server (kept alive), the cluster and the clients by rank.
async fn cluster_of(world: usize) -> (ControlServer, Cluster, Vec<Client>) {
    let (addr, cert, gather) =
        gathering(world, Duration::from_secs(10), Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for _ in 0..world {
        clients.push(Client::joined(addr, &cert).await);
    }
    let (server, cluster) = gather.await.unwrap();
    (server, cluster.unwrap(), clients)
}

fn nccl_id(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[tokio::test]
async fn rank_zeros_nccl_id_is_handed_to_every_rank() {
    bounded(async {
        let (_server, mut cluster, mut clients) = cluster_of(3).await;
        let id = nccl_id(NCCL_UNIQUE_ID_BYTES);
        // Heartbeats before the id are ignored; only rank 0's id is handed on.
        clients[1].send_msg(&WorkerMsg::heartbeat(1)).await;
        clients[0]
            .send_msg(&WorkerMsg::CollectiveId { id: id.clone() })
            .await;
        cluster
            .hand_off_collective_id(Duration::from_secs(5))
            .await
            .unwrap();
        for (rank, client) in clients.iter_mut().enumerate() {
            match client.recv_msg().await {
                CoordinatorMsg::CollectiveId { id: got } => assert_eq!(got, id, "rank {rank}"),
                other => panic!("rank {rank}: expected the NCCL id, got {other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_bad_nccl_hand_off_fails_naming_the_cause() {
    bounded(async {
        let wait = Duration::from_secs(5);
        // An id of the wrong length.
        let (_s, mut cluster, mut clients) = cluster_of(2).await;
        clients[0]
            .send_msg(&WorkerMsg::CollectiveId { id: nccl_id(16) })
            .await;
        let e = format!(
            "{:#}",
            cluster.hand_off_collective_id(wait).await.unwrap_err()
        );
        assert!(e.contains("16 bytes") && e.contains("128"), "{e}");

        // An id from a rank other than 0.
        let (_s, mut cluster, mut clients) = cluster_of(2).await;
        clients[1]
            .send_msg(&WorkerMsg::CollectiveId {
                id: nccl_id(NCCL_UNIQUE_ID_BYTES),
            })
            .await;
        let e = format!(
            "{:#}",
            cluster.hand_off_collective_id(wait).await.unwrap_err()
        );
        assert!(e.contains("rank 1 sent CollectiveId"), "{e}");

        // Rank 0 gone before sending one.
        let (_s, mut cluster, mut clients) = cluster_of(2).await;
        clients.remove(0).conn.close(0u32.into(), b"gone");
        let e = format!(
            "{:#}",
            cluster.hand_off_collective_id(wait).await.unwrap_err()
        );
        assert!(e.contains("rank 0 was lost"), "{e}");

        // Rank 0 silent (heartbeats only): the wait ends at the timeout.
        let (_s, mut cluster, mut clients) = cluster_of(1).await;
        clients[0].send_msg(&WorkerMsg::heartbeat(1)).await;
        let started = Instant::now();
        let e = format!(
            "{:#}",
            cluster
                .hand_off_collective_id(Duration::from_millis(300))
                .await
                .unwrap_err()
        );
        assert!(e.contains("did not send its NCCL unique id"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    })
    .await;
}
