//! shoal-gossip: SWIM cluster membership on port 7946, built on [foca].
//!
//! What it does:
//! - [`Membership`] (sans-IO) runs foca with our [`Identity`] (node ID, advertise address,
//!   bump), a versioned [`codec`], signed node records (identity, incarnation, [`Metadata`])
//!   spread ahead of foca's updates, an [`Admission`] directory of node keys from the control
//!   plane, push-pull full-state sync, Lifeguard-style local health and dynamic suspicion. It
//!   emits [`Event`]s: up, down, updated, left, and entry changes.
//! - **Entries**: each node's own small table of opaque keys (at most 64 bytes) and values
//!   (at most 512 bytes), set with [`Membership::set_entry`] (or [`driver::Handle::set_entry`])
//!   at a version the node chooses (`None` deletes: a tombstone). Each entry is signed by its
//!   author ([`codec::Entry`]) and believed only under the author's directory key, so a member
//!   relays others' entries but can neither forge nor alter them; for one (author, key) the
//!   higher version wins. A new entry is gossiped at once and relayed like the signed node
//!   records (a change is one small item, never the table), push-pull carries every entry
//!   held, and every node reports each change as [`Event::Entry`] and lists the live ones
//!   with [`Membership::entries`]. An author's entries go when it leaves or is removed from
//!   the directory, or after it has been down for [`Config::entries_down_grace`]; it sends
//!   them again when it is back. Tombstones are kept [`Config::tombstone_ttl`]. Gossip does not
//!   interpret them: the control plane puts its endpoint records (network, IP, MAC behind a
//!   node) there.
//! - [`auth`]: node keys ([`NodeKeys`]: the X25519 static secret and the Ed25519 key derived
//!   from it), [`PublicKeys`], the [`Admission`] directory. Who speaks is authenticated, not
//!   only that a member speaks: every datagram and stream frame is sealed per pair of nodes
//!   ([`seal`]), what speaks for a node is signed by it, and relayed membership records may
//!   not say more of a node than it stated itself.
//! - [`seal`]: the envelope (XChaCha20-Poly1305 under pair keys, sender tag, key id,
//!   never-repeating nonces); what does not open is dropped and counted.
//! - [`driver`]: the tokio shell (UDP + TCP on one address, default `0.0.0.0:7946`), with
//!   caps on TCP connections that have not authenticated yet.
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
//! use shoal_gossip::{driver, Admission, Event, Key, Keyring, Metadata, NodeKeys, Role};
//! let secret = [1u8; 32]; // the node's X25519 static secret, from the state dir
//! let keys = NodeKeys::from_secret(secret);
//! let id = "abcdefghijklmnopqrstuvw12".parse()?;
//! let meta = Metadata {
//!     vtep: "198.18.0.1".parse()?, data_port: 4789, public_key: keys.public().x25519,
//!     incarnation: [0; 16], role: Role::Manager, version: "0.1.0".into(),
//! };
//! let peer = "abcdefghijklmnopqrstuvw13".parse()?;
//! let peer_keys = NodeKeys::from_secret([2; 32]).public(); // from the manager's node list
//! let mut cfg = driver::Config::new(id, "198.18.0.1:7946".parse()?, meta,
//!     Keyring::new(Key { id: 1, secret: [9; 32] }), keys);
//! cfg.seeds = vec![(peer, "198.18.0.2:7946".parse()?)];
//! cfg.admission = Admission::only([(id, cfg.keys.public()), (peer, peer_keys)]);
//! let (handle, mut events) = driver::start(cfg).await?;
//! while let Some(ev) = events.recv().await {
//!     match ev {
//!         Event::Up(m) | Event::Updated(m) => { /* add/refresh m.id -> m.metadata */ }
//!         Event::Down(m) | Event::Left(m) => { /* remove m.id */ }
//!         Event::Entry { author, key, value: Some(v), .. } => { /* (author, key) -> v */ }
//!         Event::Entry { author, key, value: None, .. } => { /* forget (author, key) */ }
//!     }
//! }
//! handle.leave().await?;
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Our own entries (an endpoint behind this node), with a version that never goes back, not
//! even across restarts (wall-clock milliseconds, or a stored counter):
//!
//! ```no_run
//! # async fn f(handle: shoal_gossip::driver::Handle) -> Result<(), Box<dyn std::error::Error>> {
//! let version = 1_717_986_919_000; // e.g. wall-clock milliseconds
//! handle.set_entry(b"ep/4f2a".to_vec(), version, Some(b"net1 10.0.1.5 02:42:0a:00:01:05".to_vec())).await?;
//! handle.set_entry(b"ep/4f2a".to_vec(), version + 1, None).await?; // deleted
//! let all = handle.entries().await?; // every live entry known, every author's
//! # let _ = all; Ok(()) }
//! ```
//!
//! Handle methods: [`driver::Handle::set_admission`], [`driver::Handle::set_keys`],
//! [`driver::Handle::update_metadata`], [`driver::Handle::set_entry`],
//! [`driver::Handle::entries`], [`driver::Handle::join`],
//! [`driver::Handle::members`], [`driver::Handle::stats`], [`driver::Handle::leave`],
//! [`driver::Handle::shutdown`].
//!
//! [foca]: https://docs.rs/foca

#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod driver;
mod entries;
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
    Config, EntryInfo, Event, MemberInfo, MemberState, Membership, Peer, Setup, Stats, Transmit,
};
pub use seal::{Key, Keyring};
