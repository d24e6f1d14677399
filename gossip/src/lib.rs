//! shoal-gossip: SWIM cluster membership on port 7946, built on [foca].
//!
//! What it does:
//! - [`Membership`] (sans-IO) runs foca with our [`Identity`] (node ID, advertise address,
//!   bump), a versioned [`codec`], node [`Metadata`] spread as custom broadcasts, an
//!   [`Admission`] list from the control plane, push-pull full-state sync, Lifeguard-style
//!   local health and dynamic suspicion. It emits [`Event`]s: up, down, updated, left.
//! - [`seal`]: every datagram and stream frame is sealed with the cluster gossip key
//!   (XChaCha20-Poly1305, key id, never-repeating nonces); what does not open is dropped and
//!   counted.
//! - [`driver`]: the tokio shell (UDP + TCP on one address, default `0.0.0.0:7946`).
//! - [`sim`]: a deterministic many-node simulation on a virtual clock, running the same
//!   [`Membership`] code; the `gossip-sim` binary prints its measurements as JSON.
//!
//! What it does not do: it does not decide who is a member (the control plane does, through
//! [`Admission`]), does not persist anything, and knows nothing of VXLAN: the control plane
//! turns [`Event`]s into the data path's peer table. Only [`driver`] and the binaries touch
//! sockets or the clock.
//!
//! # Wiring it from the control plane
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use shoal_gossip::{driver, Admission, Event, Identity, Key, Keyring, Metadata, Role};
//! let id = "abcdefghijklmnopqrstuvw12".parse()?;
//! let meta = Metadata {
//!     vtep: "198.18.0.1".parse()?, data_port: 4789, public_key: [7; 32], incarnation: 1,
//!     role: Role::Manager, version: "0.1.0".into(),
//! };
//! let mut cfg = driver::Config::new(id, "198.18.0.1:7946".parse()?, meta,
//!     Keyring::new(Key { id: 1, secret: [9; 32] }));
//! cfg.seeds = vec!["198.18.0.2:7946".parse()?];
//! cfg.admission = Admission::Open;
//! let (handle, mut events) = driver::start(cfg).await?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         Event::Up(m) | Event::Updated(m) => { /* add/refresh m.id -> m.metadata */ }
//!         Event::Down(m) | Event::Left(m) => { /* remove m.id */ }
//!     }
//! }
//! handle.leave().await?;
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Handle methods: [`driver::Handle::set_admission`], [`driver::Handle::set_keys`],
//! [`driver::Handle::update_metadata`], [`driver::Handle::join`],
//! [`driver::Handle::members`], [`driver::Handle::stats`], [`driver::Handle::leave`],
//! [`driver::Handle::shutdown`].
//!
//! [foca]: https://docs.rs/foca

#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod driver;
pub mod identity;
pub mod membership;
pub mod node;
mod peers;
mod relay;
pub mod seal;
pub mod sim;

pub use auth::{Admission, NodeKeys, PublicKeys};
pub use identity::{Identity, Metadata, NodeId, Role};
pub use membership::{
    Config, Event, MemberInfo, MemberState, Membership, Peer, Setup, Stats, Transmit,
};
pub use seal::{Key, Keyring};
