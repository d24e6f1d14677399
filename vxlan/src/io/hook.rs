//! A hook that may take some frames off their usual path: the routing mesh (`shoal-ingress`'s
//! `mesh`) forwards published ports' flows, answers its networks' router (DNS, virtual IPs)
//! and sends flows back through the node they came in by.
//!
//! The driver asks the cheap `claims_*` first, with no lock and no copy, and calls the
//! `on_*` only for frames claimed. Frames from devices and peers reach the hook whole and with
//! complete checksums (after segmentation on the way out, before coalescing on the way in);
//! the mesh device's may be large segments with partial checksums (see `on_outside`).

use std::net::IpAddr;
use std::time::Instant;

use crate::wire::Vni;

/// Where a frame goes after the hook had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// On its usual path, as if there were no hook.
    Pass,
    /// Nowhere (the hook counted why).
    Drop,
    /// The hook's answer (in its `reply` buffer) goes back to the device the frame came from.
    Reply,
    /// The (rewritten) frame goes to the local device of network `vni`.
    Device(Vni),
    /// The (rewritten) frame goes out of the node, through the mesh device.
    Outside,
    /// The (rewritten) frame is sealed to the node at `vtep`, on network `vni`.
    Peer {
        /// The network.
        vni: Vni,
        /// The node's underlay address.
        vtep: IpAddr,
    },
}

/// See the module documentation. Frames are rewritten in place (their length stays).
pub trait FrameHook: Send + Sync {
    /// Whether a frame read from a network's device is the hook's.
    fn claims_from_device(&self, frame: &[u8]) -> bool;
    /// Whether a frame opened from a peer is the hook's.
    fn claims_from_peer(&self, frame: &[u8]) -> bool;
    /// A claimed frame from network `vni`'s device; an answer goes in `reply`.
    fn on_device(&self, now: Instant, vni: Vni, frame: &mut [u8], reply: &mut Vec<u8>) -> Steer;
    /// A claimed frame of network `vni`, opened from the node at `vtep`.
    fn on_peer(&self, now: Instant, vni: Vni, vtep: IpAddr, frame: &mut [u8]) -> Steer;
    /// A frame from the mesh device (a client outside the cluster, steered there): possibly a
    /// large TCP segment the driver cuts after the hook had it, and with its TCP/UDP checksum
    /// left `partial` (the field holds the pseudo-header sum, as Linux's CHECKSUM_PARTIAL).
    fn on_outside(&self, now: Instant, frame: &mut [u8], partial: bool) -> Steer;
}
