//! A worker that pins the coordinator by its certificate's SHA-256 (`XKD_COORDINATOR_FINGERPRINT`)
//! instead of holding the certificate: the real coordinator and the real worker client, over
//! QUIC on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use xkd_coordinator::server::ControlServer;
use xkd_protocol::transport::{Fingerprint, ServerIdentity, Trust};
use xkd_protocol::{Assignment, CollectiveKind, CoordinatorMsg, Join, PROTOCOL_VERSION};
use xkd_worker::client;

const TOKEN: &str = "pinning-token";

fn join_msg() -> Join {
    Join {
        protocol_version: PROTOCOL_VERSION,
        token: TOKEN.into(),
        collective_addr: "127.0.0.1:7000".into(),
        hostname: "test".into(),
        pid: 1,
    }
}

async fn server() -> ControlServer {
    ControlServer::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), TOKEN.into())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_fingerprint_joins() {
    let test = async {
        let mut server = server().await;
        let (addr, pin) = (server.local_addr(), server.fingerprint());
        let worker = tokio::spawn(async move {
            let (assignment, _link) = client::join(addr, &Trust::Fingerprint(pin), join_msg())
                .await
                .unwrap();
            assignment
        });
        let cluster = server
            .gather(1, Duration::from_secs(10), Duration::from_secs(10))
            .await
            .unwrap();
        let assignment = Assignment {
            run_id: "r".into(),
            rank: 0,
            world_size: 1,
            peers: Vec::new(),
            collective: CollectiveKind::TcpRing,
            config_toml: String::new(),
            config_digest: String::new(),
            out_dir: "/tmp".into(),
        };
        cluster
            .send(0, &CoordinatorMsg::Assignment(assignment.clone()))
            .await
            .unwrap();
        assert_eq!(worker.await.unwrap(), assignment);
    };
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_is_refused_naming_both() {
    let test = async {
        let server = server().await;
        let presented = server.fingerprint();
        let other = ServerIdentity::generate().unwrap();
        let pinned = Fingerprint::of(&other.cert_der);
        let got = client::join(server.local_addr(), &Trust::Fingerprint(pinned), join_msg()).await;
        let error = format!("{:#}", got.err().expect("a wrong pin joined"));
        assert!(error.contains(&pinned.to_string()), "{error}");
        assert!(error.contains(&presented.to_string()), "{error}");
    };
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .unwrap();
}
