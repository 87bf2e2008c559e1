//! Hosts on one machine for tests: a Linux network namespace per host, each with one
//! interface `eth0` (a veth pair) whose other end is a port of a bridge in a hub namespace of
//! its own. Every address and interface lives in namespaces made here; the machine's own
//! namespace gets none, so two test processes never collide. Needs root (`ip netns`); without
//! it the test fails, naming what is missing: it must not pass by skipping.
//!
//! Names carry the test process's id (`xkdmh<pid>-...`), and `Network::create` first deletes
//! namespaces of that prefix whose process is gone (a run killed before its `Drop`).

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

/// What every namespace a test makes starts with.
const PREFIX: &str = "xkdmh";

/// The hosts and the hub joining them, deleted on drop (however the test ends).
pub struct Network {
    tag: String,
    hosts: Vec<(String, Ipv4Addr)>,
}

impl Network {
    /// One namespace per `(name, address)` on a /24 (`eth0` up, the address on it), each
    /// attached to the hub's bridge `br0`. A host's port in the hub is named like the host.
    pub fn create(hosts: &[(&str, Ipv4Addr)]) -> Network {
        require_root();
        remove_stale();
        let net = Network {
            tag: format!("{PREFIX}{}", std::process::id()),
            hosts: hosts.iter().map(|(n, a)| (n.to_string(), *a)).collect(),
        };
        let hub = net.hub();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (name, addr) in &net.hosts {
            let ns = net.namespace(name);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", name, "netns",
                &hub,
            ]);
            // One segment per frame: the relay forwards frames as they are, so none may be a
            // 64 KiB offload super-frame (TCP's TSO, UDP's GSO).
            ip(&["-n", &ns, "link", "set", "eth0", "gso_max_segs", "1"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &hub, "link", "set", name, "master", "br0", "up"]);
        }
        net
    }

    /// The namespace of host `name`.
    pub fn namespace(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// The hub's namespace (the bridge, and the relay's ports).
    pub fn hub(&self) -> String {
        format!("{}-hub", self.tag)
    }

    /// The hosts' names, which are also their ports in the hub.
    pub fn ports(&self) -> Vec<String> {
        self.hosts.iter().map(|(n, _)| n.clone()).collect()
    }

    /// `program` to be run on host `name` (`ip netns exec`, which execs it: the child's pid
    /// is the program's).
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.namespace(name)])
            .arg(program);
        c
    }

    /// Runs `f` on a thread inside host `name`'s network namespace (sockets it opens belong
    /// there and keep working from any thread).
    pub fn within<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        enter_and_run(&self.namespace(name), f)
    }

    /// Runs `f` on a thread inside the hub's namespace.
    pub fn within_hub<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter_and_run(&self.hub(), f)
    }

    /// Pulls host `name`'s cable (its port in the hub down; its `eth0` loses carrier), or
    /// plugs it back.
    pub fn set_link(&self, name: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.hub(), "link", "set", name, state]);
    }

    /// Takes every port off the bridge (promiscuous, so a relay sees every frame), or puts
    /// them back on it.
    pub fn set_bridged(&self, bridged: bool) {
        for name in self.ports() {
            if bridged {
                ip(&["-n", &self.hub(), "link", "set", &name, "promisc", "off"]);
                ip(&["-n", &self.hub(), "link", "set", &name, "master", "br0"]);
            } else {
                ip(&["-n", &self.hub(), "link", "set", &name, "nomaster"]);
                ip(&["-n", &self.hub(), "link", "set", &name, "promisc", "on"]);
            }
        }
    }
}

impl Drop for Network {
    /// Deleting the hub's namespace deletes the veth pairs with their ports; the hosts'
    /// namespaces go after. Whoever ran processes in them stops those first.
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .status();
        for (name, _) in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(name)])
                .status();
        }
    }
}

/// `ip args`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces and bridges need root: fail, saying so, rather than skip.
fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test makes network namespaces, veth pairs and a bridge (`ip netns`), which needs \
         root; run it as root (uid 0, as CI does), it is not skipped"
    );
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "this test needs `ip` from iproute2 (Debian: apt-get install iproute2)"
    );
}

/// Deletes the namespaces of earlier test processes that are gone.
fn remove_stale() {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `f` on a new thread that first joins network namespace `ns` (setns(2) changes only
/// the calling thread's namespace, so the test's own threads stay where they are).
fn enter_and_run<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: a valid namespace fd; the call only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("the thread inside the namespace panicked")
}

/// The index of interface `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}
