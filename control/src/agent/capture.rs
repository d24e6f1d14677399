//! `shoal capture`, the agent's side: a fan-out of the data path's packet copies to any number
//! of readers, each with its own filter and its own bounded queue, and the pcapng encoding of
//! what a reader receives.
//!
//! The data-path threads only ever `try_send` into a reader's queue: a reader that does not
//! keep up loses copies (counted, and written into the next packet block's `epb_dropcount`),
//! never slows the data path. Outer datagrams are only UDP payloads in the data path; the
//! encoder puts an IPv4 or IPv6 and UDP header in front (addresses and ports as on the wire,
//! checksum computed) so that readers such as tshark decode them as they would a capture on
//! the underlay interface.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;
use shoal_vxlan::engine::DropReason;
use shoal_vxlan::io::capture::{CaptureRecord, CaptureSink, Direction, Layer};
use tokio::sync::mpsc;

/// Copies a reader may have waiting before further ones are dropped.
pub const QUEUE: usize = 4096;

/// Which packets one reader wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    /// Decrypted inner frames.
    pub inner: bool,
    /// Outer datagrams as on the wire.
    pub outer: bool,
    /// Only packets to or from this underlay address.
    pub peer: Option<IpAddr>,
    /// Only packets of this network (VNI).
    pub vni: Option<u32>,
}

impl Filter {
    fn layer(&self, layer: Layer) -> bool {
        match layer {
            Layer::Inner => self.inner,
            Layer::Outer => self.outer,
        }
    }

    fn matches(&self, r: &CaptureRecord<'_>) -> bool {
        self.layer(r.layer)
            && self
                .peer
                .is_none_or(|p| r.peer.is_some_and(|q| q.ip() == p))
            && self
                .vni
                .is_none_or(|v| r.vni.map(shoal_vxlan::wire::Vni::get) == Some(v))
    }
}

/// One packet copy, owned.
#[derive(Debug, Clone)]
pub struct Captured {
    /// When it was copied, since the Unix epoch.
    pub at: Duration,
    /// Sent or received.
    pub direction: Direction,
    /// Inner frame or outer datagram.
    pub layer: Layer,
    /// The other end's underlay address, if one.
    pub peer: Option<SocketAddr>,
    /// Datagrams an outbound inner frame became.
    pub fanout: usize,
    /// Why the engine dropped it, if it did.
    pub dropped: Option<DropReason>,
    /// The bytes (an Ethernet frame, or a UDP payload).
    pub data: Vec<u8>,
}

struct Reader {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Captured>,
    lost: Arc<AtomicU64>,
}

/// The readers of one direction. Each direction is fed by its own data-path thread, so the
/// two threads never touch the same lock, queue or counter.
#[derive(Default)]
struct Side {
    readers: Mutex<Vec<Reader>>,
    /// Readers wanting inner frames, outer datagrams: read without the lock.
    wanting: [AtomicUsize; 2],
}

impl Side {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        self.readers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the reader list and recounts who wants what.
    fn change(&self, f: impl FnOnce(&mut Vec<Reader>)) {
        let mut readers = self.lock();
        f(&mut readers);
        for layer in [Layer::Inner, Layer::Outer] {
            let n = readers.iter().filter(|r| r.filter.layer(layer)).count();
            self.wanting[slot(layer)].store(n, Ordering::Relaxed);
        }
    }
}

/// The fan-out installed in the data path: a [`CaptureSink`] with up to [`MAX_READERS`]
/// readers.
#[derive(Default)]
pub struct Hub {
    sides: [Side; 2],
    next_id: AtomicU64,
    /// Readers admitted (checked and counted under this lock, so two at once cannot both take
    /// the last place).
    admitted: Mutex<usize>,
}

/// Most `shoal capture` readers on one node at once: they see decrypted frames, and each costs
/// the data path a copy of every packet it wants.
pub const MAX_READERS: usize = 4;

/// A capture refused because [`MAX_READERS`] run already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_READERS} captures are running on this node already (the most it allows); stop one and try again")]
pub struct Busy;

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn slot(layer: Layer) -> usize {
    match layer {
        Layer::Inner => 0,
        Layer::Outer => 1,
    }
}

fn side(direction: Direction) -> usize {
    match direction {
        Direction::Out => 0,
        Direction::In => 1,
    }
}

impl Hub {
    /// Adds a reader with its own queues of [`QUEUE`] copies (one per direction), unless
    /// [`MAX_READERS`] are there already. It stays until the returned [`Subscription`] is
    /// dropped.
    pub fn subscribe(self: &Arc<Self>, filter: Filter) -> Result<Subscription, Busy> {
        {
            let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
            if *admitted >= MAX_READERS {
                return Err(Busy);
            }
            *admitted += 1;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rx = Vec::with_capacity(2);
        let mut lost = Vec::with_capacity(2);
        for s in &self.sides {
            let (tx, r) = mpsc::channel(QUEUE);
            let l = Arc::new(AtomicU64::new(0));
            s.change(|readers| {
                readers.push(Reader {
                    id,
                    filter,
                    tx,
                    lost: l.clone(),
                })
            });
            rx.push(r);
            lost.push(l);
        }
        Ok(Subscription {
            hub: self.clone(),
            id,
            rx,
            lost,
        })
    }

    /// Number of readers.
    pub fn readers(&self) -> usize {
        self.sides[0].lock().len()
    }

    /// Removes every reader: their queues end once drained.
    pub fn close(&self) {
        for s in &self.sides {
            s.change(Vec::clear);
        }
    }

    fn unsubscribe(&self, id: u64) {
        for s in &self.sides {
            s.change(|readers| readers.retain(|r| r.id != id));
        }
    }
}

impl CaptureSink for Hub {
    fn wants(&self, direction: Direction, layer: Layer) -> bool {
        self.sides[side(direction)].wanting[slot(layer)].load(Ordering::Relaxed) > 0
    }

    fn offer(&self, record: &CaptureRecord<'_>) {
        let readers = self.sides[side(record.direction)].lock();
        let mut at = None;
        for r in readers.iter().filter(|r| r.filter.matches(record)) {
            // Room first: a reader that is behind costs a count, not a copy or a clock read.
            let Ok(permit) = r.tx.try_reserve() else {
                r.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let at = *at.get_or_insert_with(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
            });
            permit.send(Captured {
                at,
                direction: record.direction,
                layer: record.layer,
                peer: record.peer,
                fanout: record.fanout,
                dropped: record.dropped,
                data: record.data.to_vec(),
            });
        }
    }
}

/// One reader's end: the copies (a queue per direction), and how many were lost because a
/// queue was full.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    rx: Vec<mpsc::Receiver<Captured>>,
    lost: Vec<Arc<AtomicU64>>,
}

impl Subscription {
    /// The next copy from either direction (each direction in the order the data path made
    /// them); `None` once the hub closed and both queues are drained.
    pub async fn recv(&mut self) -> Option<Captured> {
        let [out, inb] = &mut self.rx[..] else {
            return None;
        };
        tokio::select! {
            Some(c) = out.recv() => Some(c),
            Some(c) = inb.recv() => Some(c),
            else => None,
        }
    }

    /// A copy already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Captured> {
        self.rx.iter_mut().find_map(|r| r.try_recv().ok())
    }

    /// Copies lost so far because this reader's queues were full.
    pub fn lost(&self) -> u64 {
        self.lost.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
        let mut admitted = self
            .hub
            .admitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *admitted = admitted.saturating_sub(1);
    }
}

/// What the pcapng file says about where it was taken.
#[derive(Debug, Clone)]
pub struct Context {
    /// Network name.
    pub network: String,
    /// Its VNI.
    pub vni: u32,
    /// The overlay interface.
    pub interface: String,
    /// This node's host name.
    pub hostname: String,
    /// This node's VTEP: underlay address and data-path port.
    pub local: SocketAddr,
    /// Host names of the peers by underlay address, for packet comments.
    pub names: HashMap<IpAddr, String>,
}

/// Interface number of the inner frames in the pcapng output.
pub const INNER_INTERFACE: u32 = 0;
/// Interface number of the outer datagrams.
pub const OUTER_INTERFACE: u32 = 1;

/// Errors encoding pcapng.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The pcapng writer refused a block (a bug: the blocks are built here).
    #[error("cannot encode a pcapng block: {0}")]
    Pcap(#[from] pcap_file::PcapError),
    /// The outer headers could not be built (a bug, or a datagram over 64 KiB).
    #[error("cannot build the outer headers of a {0}-byte datagram")]
    Outer(usize),
}

/// Turns [`Captured`] copies into pcapng blocks: the section header and two interfaces
/// first ([`Encoder::start`]), then one enhanced packet block per copy.
pub struct Encoder {
    writer: PcapNgWriter<Vec<u8>>,
    context: Context,
    /// Copies lost as of the last block written.
    lost: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// The section header and the two interface blocks (inner: Ethernet; outer: raw IP).
    pub fn start(context: Context) -> Result<(Encoder, Vec<u8>), EncodeError> {
        let mut writer = PcapNgWriter::new(Vec::new())?;
        let interfaces = [
            (
                DataLink::ETHERNET,
                format!("{}/inner", context.network),
                format!(
                    "shoal network {} (VNI {}) on {}, node {}: decrypted frames",
                    context.network, context.vni, context.interface, context.hostname
                ),
            ),
            (
                DataLink::RAW,
                format!("{}/outer", context.network),
                format!(
                    "shoal network {} (VNI {}), node {} VTEP {}: datagrams as on the wire",
                    context.network, context.vni, context.hostname, context.local
                ),
            ),
        ];
        for (linktype, name, description) in interfaces {
            writer.write_pcapng_block(InterfaceDescriptionBlock {
                linktype,
                snaplen: 0,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Owned(name)),
                    InterfaceDescriptionOption::IfDescription(Cow::Owned(description)),
                    // Nanosecond timestamps (the block writer writes nanoseconds).
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            })?;
        }
        let header = std::mem::take(writer.get_mut());
        Ok((
            Encoder {
                writer,
                context,
                lost: 0,
            },
            header,
        ))
    }

    /// One copy as a packet block; `lost` is the reader's running count of lost copies, of
    /// which those since the previous block go into `epb_dropcount`.
    pub fn packet(&mut self, c: &Captured, lost: u64) -> Result<Vec<u8>, EncodeError> {
        let (interface, data): (u32, Cow<'_, [u8]>) = match c.layer {
            Layer::Inner => (INNER_INTERFACE, Cow::Borrowed(&c.data)),
            Layer::Outer => (OUTER_INTERFACE, Cow::Owned(self.outer(c)?)),
        };
        let mut options = vec![
            EnhancedPacketOption::Comment(Cow::Owned(self.comment(c))),
            // epb_flags bits 0-1: 1 inbound, 2 outbound.
            EnhancedPacketOption::Flags(match c.direction {
                Direction::In => 1,
                Direction::Out => 2,
            }),
        ];
        if lost > self.lost {
            options.push(EnhancedPacketOption::DropCount(lost - self.lost));
            self.lost = lost;
        }
        let len = u32::try_from(data.len()).map_err(|_| EncodeError::Outer(data.len()))?;
        self.writer.write_pcapng_block(EnhancedPacketBlock {
            interface_id: interface,
            timestamp: c.at,
            original_len: len,
            data,
            options,
        })?;
        Ok(std::mem::take(self.writer.get_mut()))
    }

    /// `to n2 (198.18.0.2:4789)`, `from n3 (...), dropped: authentication`, ...
    fn comment(&self, c: &Captured) -> String {
        let mut text = match (c.direction, c.peer) {
            (Direction::Out, Some(p)) => format!("to {}", self.name(p)),
            (Direction::In, Some(p)) => format!("from {}", self.name(p)),
            (Direction::Out, None) if c.fanout > 1 => format!("flooded to {} peers", c.fanout),
            (Direction::Out, None) if c.dropped.is_none() => "answered locally".to_owned(),
            (Direction::In, None) => "local answer".to_owned(),
            (Direction::Out, None) => "to no peer".to_owned(),
        };
        if let Some(reason) = c.dropped {
            text.push_str(", dropped: ");
            text.push_str(reason.label());
        }
        text
    }

    fn name(&self, peer: SocketAddr) -> String {
        match self.context.names.get(&peer.ip()) {
            Some(name) => format!("{name} ({peer})"),
            None => format!("unknown peer {peer}"),
        }
    }

    /// The UDP payload with IP and UDP headers in front, as it travelled.
    fn outer(&self, c: &Captured) -> Result<Vec<u8>, EncodeError> {
        let local = self.context.local;
        let peer = c.peer.unwrap_or(local);
        let (src, dst) = match c.direction {
            Direction::Out => (local, peer),
            Direction::In => (peer, local),
        };
        let builder = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
            }
            (s, d) => etherparse::PacketBuilder::ipv6(v6(s).octets(), v6(d).octets(), 64),
        }
        .udp(src.port(), dst.port());
        let mut out = Vec::with_capacity(builder.size(c.data.len()));
        builder
            .write(&mut out, &c.data)
            .map_err(|_| EncodeError::Outer(c.data.len()))?;
        Ok(out)
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    fn context() -> Context {
        Context {
            network: "ingress".into(),
            vni: 4096,
            interface: "shoal-ingress".into(),
            hostname: "n1".into(),
            local: "198.18.0.1:4789".parse().unwrap(),
            names: [("198.18.0.2".parse().unwrap(), "n2".to_owned())].into(),
        }
    }

    fn record<'a>(layer: Layer, peer: &str, data: &'a [u8]) -> CaptureRecord<'a> {
        CaptureRecord {
            direction: Direction::In,
            layer,
            peer: Some(peer.parse().unwrap()),
            fanout: 1,
            dropped: None,
            vni: Some(shoal_vxlan::wire::Vni::new(4096).unwrap()),
            data,
        }
    }

    #[test]
    fn readers_get_what_their_filter_says() {
        let hub = Arc::new(Hub::default());
        assert!(!hub.wants(Direction::In, Layer::Inner));
        let mut inner = hub
            .subscribe(Filter {
                inner: true,
                outer: false,
                peer: None,
                vni: Some(4096),
            })
            .unwrap();
        let mut n3 = hub
            .subscribe(Filter {
                inner: true,
                outer: true,
                peer: Some("198.18.0.3".parse().unwrap()),
                vni: None,
            })
            .unwrap();
        assert!(hub.wants(Direction::Out, Layer::Inner));
        assert!(hub.wants(Direction::Out, Layer::Outer));
        hub.offer(&record(Layer::Inner, "198.18.0.2:4789", b"a"));
        hub.offer(&record(Layer::Outer, "198.18.0.3:4789", b"b"));
        hub.offer(&record(Layer::Inner, "198.18.0.3:4789", b"c"));
        // Another network's frame: only the reader of every network takes it.
        let mut other = record(Layer::Inner, "198.18.0.3:4789", b"d");
        other.vni = Some(shoal_vxlan::wire::Vni::new(4097).unwrap());
        hub.offer(&other);
        let got = |s: &mut Subscription| {
            std::iter::from_fn(|| s.try_recv())
                .map(|c| c.data)
                .collect::<Vec<_>>()
        };
        assert_eq!(got(&mut inner), [b"a".to_vec(), b"c".to_vec()]);
        assert_eq!(got(&mut n3), [b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        drop(n3);
        assert!(!hub.wants(Direction::In, Layer::Outer));
        drop(inner);
        assert_eq!(hub.readers(), 0);
        // At most MAX_READERS at once; a place frees when one goes.
        let any = Filter {
            inner: true,
            outer: true,
            peer: None,
            vni: None,
        };
        let mut held: Vec<Subscription> = (0..MAX_READERS)
            .map(|_| hub.subscribe(any).unwrap())
            .collect();
        assert_eq!(hub.subscribe(any).err(), Some(Busy));
        held.pop();
        held.push(hub.subscribe(any).unwrap());
        assert_eq!(hub.readers(), MAX_READERS);
        drop(held);
        assert!(!hub.wants(Direction::In, Layer::Inner));
    }

    #[test]
    fn a_reader_that_does_not_read_loses_copies_and_never_blocks() {
        let hub = Arc::new(Hub::default());
        let mut sub = hub
            .subscribe(Filter {
                inner: true,
                outer: true,
                peer: None,
                vni: None,
            })
            .unwrap();
        let extra = 100;
        for i in 0..QUEUE + extra {
            hub.offer(&record(Layer::Inner, "198.18.0.2:4789", &i.to_be_bytes()));
        }
        assert_eq!(sub.lost(), extra as u64);
        // The first QUEUE copies are there, in order.
        let first = sub.try_recv().unwrap();
        assert_eq!(first.data, 0usize.to_be_bytes());
    }

    #[test]
    fn pcapng_reads_back_with_interfaces_comments_and_outer_headers() {
        let (mut enc, mut file) = Encoder::start(context()).unwrap();
        let frame = [0xaau8; 60];
        let mut inner = Captured {
            at: Duration::from_nanos(1_700_000_000_123_456_789),
            direction: Direction::Out,
            layer: Layer::Inner,
            peer: Some("198.18.0.2:4789".parse().unwrap()),
            fanout: 1,
            dropped: None,
            data: frame.to_vec(),
        };
        file.extend(enc.packet(&inner, 0).unwrap());
        let outer = Captured {
            direction: Direction::In,
            layer: Layer::Outer,
            peer: Some("198.18.0.9:4789".parse().unwrap()),
            dropped: Some(DropReason::Authentication),
            data: vec![0x48, 0, 0, 0, 1, 2, 3, 4],
            ..inner.clone()
        };
        file.extend(enc.packet(&outer, 3).unwrap());
        inner.peer = None;
        inner.fanout = 2;
        file.extend(enc.packet(&inner, 3).unwrap());

        let mut reader = PcapNgReader::new(&file[..]).unwrap();
        let mut interfaces = Vec::new();
        let mut packets = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(i) => interfaces.push(i.into_owned()),
                Block::EnhancedPacket(p) => packets.push(p.into_owned()),
                _ => {}
            }
        }
        assert_eq!(interfaces.len(), 2);
        assert_eq!(interfaces[0].linktype, DataLink::ETHERNET);
        assert_eq!(interfaces[1].linktype, DataLink::RAW);
        assert!(interfaces[0].options.iter().any(|o| matches!(o,
            InterfaceDescriptionOption::IfDescription(d) if d.contains("ingress") && d.contains("decrypted"))));
        assert_eq!(packets.len(), 3);
        let comment = |p: &EnhancedPacketBlock<'_>| {
            p.options
                .iter()
                .find_map(|o| match o {
                    EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(packets[0].interface_id, INNER_INTERFACE);
        assert_eq!(&packets[0].data[..], &frame[..]);
        assert_eq!(packets[0].timestamp, inner.at);
        assert_eq!(comment(&packets[0]), "to n2 (198.18.0.2:4789)");
        assert_eq!(packets[1].interface_id, OUTER_INTERFACE);
        assert_eq!(
            comment(&packets[1]),
            "from unknown peer 198.18.0.9:4789, dropped: authentication"
        );
        assert!(packets[1]
            .options
            .contains(&EnhancedPacketOption::DropCount(3)));
        // The outer block is IPv4 + UDP 198.18.0.9:4789 -> 198.18.0.1:4789 + the payload.
        let ip = etherparse::SlicedPacket::from_ip(&packets[1].data).unwrap();
        let Some(etherparse::NetSlice::Ipv4(v4)) = &ip.net else {
            panic!("not IPv4: {ip:?}");
        };
        assert_eq!(v4.header().source(), [198, 18, 0, 9]);
        assert_eq!(v4.header().destination(), [198, 18, 0, 1]);
        let Some(etherparse::TransportSlice::Udp(udp)) = &ip.transport else {
            panic!("not UDP");
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (4789, 4789));
        assert_eq!(udp.payload(), &outer.data[..]);
        assert_eq!(comment(&packets[2]), "flooded to 2 peers");
        // No new losses: no drop count on the third block.
        assert!(!packets[2]
            .options
            .iter()
            .any(|o| matches!(o, EnhancedPacketOption::DropCount(_))));
    }
}
