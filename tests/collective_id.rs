//! The NCCL unique-id hand-off through the real coordinator and the real worker client, over
//! QUIC on loopback. No NCCL is needed: the id is opaque bytes to both; only rank 0 makes one.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use xkd_coordinator::server::ControlServer;
use xkd_protocol::transport::Trust;
use xkd_protocol::{
    Assignment, CollectiveKind, CoordinatorMsg, Join, NCCL_UNIQUE_ID_BYTES, PROTOCOL_VERSION,
};
use xkd_worker::client;

const TOKEN: &str = "hand-off-token";
const WORLD: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rank_builds_from_the_id_rank_zero_made() {
    let test = async {
        let mut server =
            ControlServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), TOKEN.into())
                .await
                .unwrap();
        let (addr, cert) = (
            server.local_addr(),
            Trust::Certificate(server.cert_der().to_vec()),
        );
        let made: Vec<u8> = (0..NCCL_UNIQUE_ID_BYTES)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let workers: Vec<_> = (0..WORLD)
            .map(|i| {
                let (cert, made) = (cert.clone(), made.clone());
                tokio::spawn(async move {
                    let join = Join {
                        protocol_version: PROTOCOL_VERSION,
                        token: TOKEN.into(),
                        collective_addr: format!("127.0.0.1:{}", 7000 + i),
                        hostname: "test".into(),
                        pid: i as u32,
                    };
                    let (assignment, mut link) = client::join(addr, &cert, join).await.unwrap();
                    assert_eq!(assignment.collective, CollectiveKind::Nccl);
                    let rank = assignment.rank;
                    let id = link
                        .collective_id(rank, || {
                            assert_eq!(rank, 0, "only rank 0 creates the id");
                            Ok(made)
                        })
                        .await
                        .unwrap();
                    (rank, id)
                })
            })
            .collect();
        let mut cluster = server
            .gather(WORLD, Duration::from_secs(10), Duration::from_secs(10))
            .await
            .unwrap();
        for rank in 0..WORLD as u32 {
            let assignment = Assignment {
                run_id: "r".into(),
                rank,
                world_size: WORLD as u32,
                peers: Vec::new(),
                collective: CollectiveKind::Nccl,
                config_toml: String::new(),
                config_digest: String::new(),
                out_dir: "/tmp".into(),
            };
            cluster
                .send(rank, &CoordinatorMsg::Assignment(assignment))
                .await
                .unwrap();
        }
        cluster
            .hand_off_collective_id(Duration::from_secs(10))
            .await
            .unwrap();
        let mut ranks = Vec::new();
        for worker in workers {
            let (rank, id) = worker.await.unwrap();
            assert_eq!(id, made, "rank {rank} got other bytes than rank 0 made");
            ranks.push(rank);
        }
        ranks.sort();
        assert_eq!(ranks, [0, 1, 2]);
    };
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the hand-off hung");
}
