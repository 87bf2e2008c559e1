//! A slow link for tests: a TCP relay on 127.0.0.1 that passes what clients send to the
//! upstream server at a capped rate (replies pass at full speed), so large uploads take long
//! while small requests stay quick. Threads and std sockets only; stopped on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct SlowProxy {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
}

impl SlowProxy {
    /// Relays to `upstream`, client-to-server bytes at most `bytes_per_s`.
    pub fn start(upstream: SocketAddr, bytes_per_s: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the proxy binds");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || pipe(client, server, Some(bytes_per_s)));
                        std::thread::spawn(move || pipe(s2, c2, None));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SlowProxy { addr, done }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either side closes, at most `rate` bytes a second: each chunk
/// is followed by its share of a second, so an idle keep-alive connection saves no credit.
fn pipe(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(rate) = rate {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
