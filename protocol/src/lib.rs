//! Wire types and framing between the coordinator and its workers. The config they carry is
//! `xkd-config`'s; here it crosses the wire as its resolved TOML.
//!
//! Nothing outside this crate derives the wire format. This crate does no I/O policy: it encodes,
//! decodes and checks frames, and builds QUIC endpoint configs; who connects when is the
//! coordinator's and the worker's business.

pub mod frame;
pub mod messages;
pub mod transport;

pub use messages::*;
pub use xkd_config::Modality;
