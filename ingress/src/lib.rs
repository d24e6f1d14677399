//! shoal's overlay networks, starting with `ingress`.
//!
//! - [`network`]: what a network is (name, VNI, subnet, encrypted or plain) and the MTU its
//!   interface gets on a given underlay.
//! - [`ipam`]: address allocation inside a network's subnet, pure and deterministic so the
//!   manager's state machine can run it.
//! - [`arp`]: ARP requests for overlay addresses answered on the node, from the table the
//!   control plane keeps, so known peers need no flooding.
//! - [`maglev`]: Maglev consistent hashing and the flow hash, the routing mesh's backend choice,
//!   the same on every node.
//! - [`dns`]: the answering half of the service-name DNS responder (A records, authoritative).
//! - [`overlay`]: the overlay on one node: the `shoal-ingress` TAP device, the data-path socket
//!   and the engine, kept in step with the node list.
//!
//! All but [`overlay`] are pure code with no IO.

pub mod arp;
pub mod dns;
pub mod ipam;
pub mod maglev;
pub mod mesh;
pub mod network;
pub mod overlay;

pub use network::{NetworkSpec, INGRESS_NAME, INGRESS_VNI};
