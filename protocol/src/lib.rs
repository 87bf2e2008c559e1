//! Wire types and framing between the coordinator and its workers, and the config schema.
//!
//! Nothing outside this crate derives the wire format. This crate does no I/O policy: it encodes,
//! decodes and checks frames, and builds QUIC endpoint configs; who connects when is the
//! coordinator's and the worker's business.

pub mod config;
pub mod frame;
pub mod messages;
pub mod transport;

pub use config::{Config, ConfigError, Direction, Modality};
pub use messages::*;
