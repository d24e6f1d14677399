//! Live copies of the frames and datagrams the data path handles, for packet capture.
//!
//! The driver offers each packet to an installed [`CaptureSink`] as a borrowed
//! [`CaptureRecord`]; the sink decides whether it wants it (by direction, layer and peer) and
//! copies what it keeps. A sink must never block: when its reader is slow it drops the copy
//! and counts it, so capture can never slow or stop the data path. Each data-path thread
//! keeps its own reference to the sink, refreshed only when one is installed or removed: with
//! no sink the cost is one atomic load per batch, with one two more for
//! [`CaptureSink::wants`].

use std::net::SocketAddr;

use crate::engine::DropReason;

/// Which way a packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the device towards the underlay (sent).
    Out,
    /// From the underlay towards the device (received).
    In,
}

/// Which view of a packet a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// The Ethernet frame, decrypted (as the device sees it).
    Inner,
    /// The UDP payload as it is on the wire: the VXLAN header or sealed envelope and what
    /// follows it.
    Outer,
}

/// One packet offered for capture. The data is borrowed: copy it to keep it.
#[derive(Debug, Clone, Copy)]
pub struct CaptureRecord<'a> {
    /// Sent or received.
    pub direction: Direction,
    /// Inner frame or outer datagram.
    pub layer: Layer,
    /// The underlay address of the other end: destination when sent, source when received.
    /// `None` for an inner frame that went nowhere (dropped before a destination was known)
    /// or that was flooded to several peers (see [`CaptureRecord::fanout`]).
    pub peer: Option<SocketAddr>,
    /// How many datagrams an outbound inner frame became (0 when it was dropped, more than 1
    /// when it was flooded). 1 for every other record.
    pub fanout: usize,
    /// Why the engine dropped this packet, if it did. A received datagram that did not open
    /// is still offered as an outer record, with the reason.
    pub dropped: Option<DropReason>,
    /// The network: the frame's, or the datagram's VXLAN header's (`None` for a datagram
    /// too short to have one).
    pub vni: Option<crate::wire::Vni>,
    /// The bytes.
    pub data: &'a [u8],
}

/// Takes copies of packets. Called on the data-path threads: must return quickly and never
/// block.
pub trait CaptureSink: Send + Sync {
    /// Whether any record of this direction and layer could be wanted, so the driver can skip
    /// making one (an outbound inner frame must be copied before it is sealed in place).
    fn wants(&self, direction: Direction, layer: Layer) -> bool;

    /// Offers one record.
    fn offer(&self, record: &CaptureRecord<'_>);
}
