//! shoal's data-plane core: everything a packet of the overlay goes through, as pure code.
//!
//! - [`wire`]: the VXLAN header of RFC 7348 and shoal's sealed envelope (`docs/wire.md`), as
//!   checked views over caller bytes with `parse`/`emit` representations.
//! - [`crypto`]: per-pair, per-direction ChaCha20-Poly1305 keys derived from the nodes' static
//!   X25519 keys and the manager's key epochs; sessions that seal in place with counter nonces.
//! - [`replay`]: the sliding anti-replay window (RFC 6479).
//! - [`fdb`]: MAC to VTEP per network, and the flood list for head-end replication.
//! - [`engine`]: the sans-IO engine that ties them together: frames in, datagrams out, and back.
//! - [`offload`]: TCP segmentation and coalescing for a TAP device with offloads.
//! - [`buffer`]: packet buffers with headroom, recycled so the steady state does not allocate.
//!
//! - [`io`]: the thin shell that runs the engine on a TAP device and a UDP socket, with threads.
//!
//! Everything but [`io`] is sans-IO: no sockets, no devices, no clock reads, no threads. The
//! caller passes time in and does the IO; that is what lets the tests, fuzzers and benchmarks run
//! the same code as the agent.

#![deny(unsafe_code)] // allowed in `io` only, each block with a SAFETY line

pub mod buffer;
pub mod crypto;
pub mod engine;
pub mod fdb;
#[expect(
    unsafe_code,
    reason = "the TAP device and the batched UDP syscalls; each block has a SAFETY line"
)]
pub mod io;
pub mod offload;
pub mod replay;
pub mod testing;
pub mod wire;

pub use buffer::{Packet, Transmit, Transmits};
pub use engine::{DropReason, Engine, Opened};
pub use wire::{Mac, Vni};
