//! The IO shell around the sans-IO engine: the TAP device, the UDP socket on the data-path port,
//! and the threads that move packets between them through the engine.
//!
//! This is the only part of the crate that touches devices, sockets or the clock.

pub mod capture;
mod driver;
pub mod hook;
pub mod tap;
pub mod udp;

pub use capture::{CaptureRecord, CaptureSink};
pub use driver::{Dataplane, IoCounters, LocalResponder};
pub use hook::{FrameHook, Steer};
pub use tap::Tap;
