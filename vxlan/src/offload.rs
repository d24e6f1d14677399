//! Segmentation and coalescing for a TAP device with offloads (`IFF_VNET_HDR`).
//!
//! With `TUNSETOFFLOAD` the kernel hands the TAP reader TCP segments of up to 64 KiB (TSO) and
//! frames whose checksum it left for later (checksum offload), each behind a `virtio_net_hdr`.
//! [`segment`] turns such a read into frames that fit the overlay MTU, with every checksum
//! complete, ready to seal. In the other direction, [`Coalescer`] merges consecutive in-order
//! TCP segments of one flow back into one large frame the kernel takes in a single write (GRO
//! done in user space), so the receiving stack sees few large packets instead of many small
//! ones.
//!
//! Pure code over caller buffers: no IO, no allocation after construction.

use etherparse::checksum::Sum16BitWords;

/// The `virtio_net_hdr` that precedes every frame on a TAP device opened with
/// `IFF_VNET_HDR` (Linux `include/uapi/linux/virtio_net.h`), little-endian as on every Linux
/// TAP of this machine's architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// `NEEDS_CSUM` / `DATA_VALID`.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (Ethernet to TCP).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (offset of the L4 header).
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// Length on the wire.
    pub const LEN: usize = 10;
    /// The checksum from `csum_start` to the end is still to be computed.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// The checksum is known good.
    pub const F_DATA_VALID: u8 = 2;
    /// Not a GSO frame.
    pub const GSO_NONE: u8 = 0;
    /// TCP over IPv4, to be segmented.
    pub const GSO_TCPV4: u8 = 1;
    /// TCP over IPv6, to be segmented.
    pub const GSO_TCPV6: u8 = 4;
    /// ECN bit of `gso_type`.
    pub const GSO_ECN: u8 = 0x80;

    /// Reads a header from the first [`Self::LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header into the first [`Self::LEN`] bytes.
    pub fn emit(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why a frame from the device could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The headers are cut short or inconsistent.
    #[error("malformed frame from the device")]
    Malformed,
    /// A GSO type this code does not segment (only TCP is enabled on the device).
    #[error("unsupported GSO type {0:#x}")]
    Unsupported(u8),
}

const ETH: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// The largest header block handled: Ethernet + IPv6 + TCP with full options.
const MAX_HEADERS: usize = ETH + 40 + 60;

/// Where the IP and TCP headers of a frame are.
#[derive(Debug, Clone, Copy)]
struct Layout {
    v6: bool,
    l4: usize,
    headers: usize,
}

fn tcp_layout(frame: &[u8]) -> Option<Layout> {
    let ethertype = frame.get(12..14)?;
    let (v6, l4) = if ethertype == ETHERTYPE_IPV4 {
        let vihl = *frame.get(ETH)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 || *frame.get(ETH + 9)? != PROTO_TCP {
            return None;
        }
        (false, ETH + ihl)
    } else if ethertype == ETHERTYPE_IPV6 {
        if *frame.get(ETH)? >> 4 != 6 || *frame.get(ETH + 6)? != PROTO_TCP {
            return None;
        }
        (true, ETH + 40)
    } else {
        return None;
    };
    let doff = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || frame.len() < l4 + doff {
        return None;
    }
    Some(Layout {
        v6,
        l4,
        headers: l4 + doff,
    })
}

/// The pseudo-header sum (RFC 793 / RFC 8200 §8.1) for a TCP segment of `tcp_len` bytes.
fn pseudo_sum(frame: &[u8], lay: Layout, tcp_len: usize) -> Sum16BitWords {
    let addrs = if lay.v6 {
        &frame[ETH + 8..ETH + 40]
    } else {
        &frame[ETH + 12..ETH + 20]
    };
    let sum = Sum16BitWords::new().add_slice(addrs);
    if lay.v6 {
        sum.add_slice(&(tcp_len as u32).to_be_bytes())
            .add_slice(&[0, 0, 0, PROTO_TCP])
    } else {
        sum.add_2bytes([0, PROTO_TCP])
            .add_2bytes((tcp_len as u16).to_be_bytes())
    }
}

fn set_ip_lengths(headers: &mut [u8], lay: Layout, total_after_l3_start: usize) {
    if lay.v6 {
        let payload = (total_after_l3_start - 40) as u16;
        headers[ETH + 4..ETH + 6].copy_from_slice(&payload.to_be_bytes());
    } else {
        headers[ETH + 2..ETH + 4].copy_from_slice(&(total_after_l3_start as u16).to_be_bytes());
        headers[ETH + 10..ETH + 12].fill(0);
        let sum = Sum16BitWords::new()
            .add_slice(&headers[ETH..lay.l4])
            .ones_complement();
        headers[ETH + 10..ETH + 12].copy_from_slice(&sum.to_ne_bytes());
    }
}

/// Splits a frame read from the device (after its [`VirtioNetHdr`]) into frames of at most
/// `hdr.gso_size` payload bytes each, with complete IP and TCP checksums, and hands each to
/// `sink` as (headers, payload): the frame is their concatenation. A frame that needs no
/// segmentation is handed over whole (as headers, with an empty payload), its checksum
/// completed if the device left it partial.
pub fn segment(
    hdr: &VirtioNetHdr,
    frame: &mut [u8],
    mut sink: impl FnMut(&[u8], &[u8]),
) -> Result<usize, SegmentError> {
    let gso = hdr.gso_type & !VirtioNetHdr::GSO_ECN;
    if gso == VirtioNetHdr::GSO_NONE {
        if hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start);
            let at = start + usize::from(hdr.csum_offset);
            if at + 2 > frame.len() {
                return Err(SegmentError::Malformed);
            }
            // The field holds the pseudo-header sum already (Linux CHECKSUM_PARTIAL).
            let sum = Sum16BitWords::new()
                .add_slice(&frame[start..])
                .ones_complement();
            frame[at..at + 2].copy_from_slice(&sum.to_ne_bytes());
        }
        sink(frame, &[]);
        return Ok(1);
    }
    if gso != VirtioNetHdr::GSO_TCPV4 && gso != VirtioNetHdr::GSO_TCPV6 {
        return Err(SegmentError::Unsupported(hdr.gso_type));
    }
    let lay = tcp_layout(frame).ok_or(SegmentError::Malformed)?;
    if lay.v6 != (gso == VirtioNetHdr::GSO_TCPV6) || lay.headers > MAX_HEADERS {
        return Err(SegmentError::Malformed);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(SegmentError::Malformed);
    }
    let (head, payload) = frame.split_at(lay.headers);
    let mut scratch = [0u8; MAX_HEADERS];
    let h = &mut scratch[..lay.headers];
    h.copy_from_slice(head);
    let seq0 = u32::from_be_bytes([h[lay.l4 + 4], h[lay.l4 + 5], h[lay.l4 + 6], h[lay.l4 + 7]]);
    let id0 = u16::from_be_bytes([h[ETH + 4], h[ETH + 5]]);
    let flags0 = h[lay.l4 + 13];
    let count = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let last = i + 1 == count;
        let offset = (i * mss) as u32;
        h[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq0.wrapping_add(offset).to_be_bytes());
        let mut flags = flags0;
        if !last {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        h[lay.l4 + 13] = flags;
        if !lay.v6 {
            h[ETH + 4..ETH + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        }
        let tcp_len = lay.headers - lay.l4 + chunk.len();
        set_ip_lengths(h, lay, lay.headers - ETH + chunk.len());
        h[lay.l4 + 16..lay.l4 + 18].fill(0);
        let sum = pseudo_sum(h, lay, tcp_len)
            .add_slice(&h[lay.l4..])
            .add_slice(chunk)
            .ones_complement();
        h[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&sum.to_ne_bytes());
        sink(h, chunk);
    }
    Ok(count)
}

/// Merges consecutive in-order TCP segments of one flow into one large frame for the device.
#[derive(Debug)]
pub struct Coalescer {
    /// [`VirtioNetHdr`] space, then the merged frame.
    buf: Vec<u8>,
    len: usize,
    lay: Option<Layout>,
    mss: usize,
    next_seq: u32,
    segments: usize,
    max: usize,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// A coalescer whose merged frames stay under 64 KiB.
    pub fn new() -> Self {
        let max = 65_535;
        Coalescer {
            buf: vec![0u8; VirtioNetHdr::LEN + max],
            len: 0,
            lay: None,
            mss: 0,
            next_seq: 0,
            segments: 0,
            max,
        }
    }

    fn frame(&self) -> &[u8] {
        &self.buf[VirtioNetHdr::LEN..VirtioNetHdr::LEN + self.len]
    }

    /// Whether `frame` continues the held flow: same headers but sequence number, flags and
    /// checksums, the next sequence number, the held segments all full-sized, and room left.
    fn continues(&self, frame: &[u8], lay: Layout, payload: usize) -> bool {
        let Some(held) = self.lay else { return false };
        let cur = self.frame();
        if held.headers != lay.headers || held.v6 != lay.v6 || payload > self.mss {
            return false;
        }
        if self.len + payload > self.max || cur[held.l4 + 13] & (TCP_PSH | TCP_FIN) != 0 {
            return false;
        }
        let seq = u32::from_be_bytes([
            frame[lay.l4 + 4],
            frame[lay.l4 + 5],
            frame[lay.l4 + 6],
            frame[lay.l4 + 7],
        ]);
        if seq != self.next_seq {
            return false;
        }
        // Headers equal except: IPv4 total length, id and checksum; IPv6 payload length;
        // TCP sequence number, flags (PSH may end the run) and checksum.
        let same = |a: core::ops::Range<usize>| cur[a.clone()] == frame[a];
        let ip_same = if lay.v6 {
            same(0..ETH + 4) && same(ETH + 6..lay.l4)
        } else {
            same(0..ETH + 2) && same(ETH + 6..ETH + 10) && same(ETH + 12..lay.l4)
        };
        ip_same
            && same(lay.l4..lay.l4 + 4)
            && same(lay.l4 + 8..lay.l4 + 13)
            && (cur[lay.l4 + 13] | TCP_PSH) == (frame[lay.l4 + 13] | TCP_PSH)
            && same(lay.l4 + 14..lay.l4 + 16)
            && same(lay.l4 + 18..lay.headers)
    }

    /// Takes one frame opened from the overlay. Whatever can no longer grow is handed to
    /// `write` as a device buffer ([`VirtioNetHdr`] then the frame).
    pub fn push(&mut self, frame: &[u8], write: &mut impl FnMut(&[u8])) {
        // Mergeable: plain TCP data segments (ACK, maybe PSH; no SYN/FIN/RST/URG/ECE/CWR), no
        // IPv4 options or fragments, no Ethernet padding.
        let mergeable = tcp_layout(frame).filter(|l| {
            let ip_len = if l.v6 {
                40 + usize::from(u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]))
            } else {
                usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]))
            };
            let ip_ok = l.v6 || {
                let frag = u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]);
                frag & 0x3fff == 0 && l.l4 == ETH + 20
            };
            let flags = frame[l.l4 + 13];
            ETH + ip_len == frame.len()
                && frame.len() > l.headers
                && flags & !(TCP_PSH | 0x10) == 0
                && flags & 0x10 != 0
                && ip_ok
        });
        let Some(lay) = mergeable else {
            self.flush(write);
            write_plain(&mut self.buf, frame, write);
            return;
        };
        let payload = frame.len() - lay.headers;
        if self.continues(frame, lay, payload) {
            let at = VirtioNetHdr::LEN + self.len;
            self.buf[at..at + payload].copy_from_slice(&frame[lay.headers..]);
            self.len += payload;
            self.segments += 1;
            self.next_seq = self.next_seq.wrapping_add(payload as u32);
            // A PSH ends the run; so does a short segment (nothing may follow it).
            let flags = frame[lay.l4 + 13];
            let l4 = lay.l4 + 13;
            self.buf[VirtioNetHdr::LEN + l4] |= flags & TCP_PSH;
            if flags & TCP_PSH != 0 || payload < self.mss {
                self.flush(write);
            }
            return;
        }
        self.flush(write);
        self.buf[VirtioNetHdr::LEN..VirtioNetHdr::LEN + frame.len()].copy_from_slice(frame);
        self.len = frame.len();
        self.lay = Some(lay);
        self.mss = payload;
        self.segments = 1;
        let seq = u32::from_be_bytes([
            frame[lay.l4 + 4],
            frame[lay.l4 + 5],
            frame[lay.l4 + 6],
            frame[lay.l4 + 7],
        ]);
        self.next_seq = seq.wrapping_add(payload as u32);
        if frame[lay.l4 + 13] & TCP_PSH != 0 {
            self.flush(write);
        }
    }

    /// Hands over the held frame, if any.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8])) {
        let Some(lay) = self.lay.take() else { return };
        let len = self.len;
        let segments = self.segments;
        self.len = 0;
        self.segments = 0;
        let (hdr_space, rest) = self.buf.split_at_mut(VirtioNetHdr::LEN);
        let frame = &mut rest[..len];
        let mut hdr = VirtioNetHdr::default();
        if segments > 1 {
            set_ip_lengths(frame, lay, len - ETH);
            let tcp_len = len - lay.l4;
            // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not complemented.
            let partial = !pseudo_sum(frame, lay, tcp_len).ones_complement();
            frame[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&partial.to_ne_bytes());
            hdr = VirtioNetHdr {
                flags: VirtioNetHdr::F_NEEDS_CSUM,
                gso_type: if lay.v6 {
                    VirtioNetHdr::GSO_TCPV6
                } else {
                    VirtioNetHdr::GSO_TCPV4
                },
                hdr_len: lay.headers as u16,
                gso_size: self.mss as u16,
                csum_start: lay.l4 as u16,
                csum_offset: 16,
            };
        }
        hdr.emit(hdr_space);
        write(&self.buf[..VirtioNetHdr::LEN + len]);
    }
}

/// Writes a frame as is, behind an all-zero [`VirtioNetHdr`], using `buf` as scratch.
fn write_plain(buf: &mut [u8], frame: &[u8], write: &mut impl FnMut(&[u8])) {
    VirtioNetHdr::default().emit(buf);
    buf[VirtioNetHdr::LEN..VirtioNetHdr::LEN + frame.len()].copy_from_slice(frame);
    write(&buf[..VirtioNetHdr::LEN + frame.len()]);
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;

    const SRC_MAC: [u8; 6] = [2, 0x42, 10, 0, 0, 2];
    const DST_MAC: [u8; 6] = [2, 0x42, 10, 0, 0, 3];

    fn tcp(v6: bool, seq: u32, id: u16, psh: bool, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
        let b = if v6 {
            b.ipv6([0xfd; 16], [0xfe; 16], 64)
        } else {
            let mut ip = etherparse::Ipv4Header::new(
                0,
                64,
                etherparse::IpNumber::TCP,
                [198, 19, 0, 2],
                [198, 19, 0, 3],
            )
            .unwrap();
            ip.identification = id;
            ip.dont_fragment = true;
            PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
                .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        };
        let mut t = b.tcp(40000, 5201, seq, 501).ack(77);
        if psh {
            t = t.psh();
        }
        let mut out = Vec::new();
        t.write(&mut out, payload).unwrap();
        out
    }

    /// Checks the IP and TCP checksums of a frame.
    fn checksums_ok(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            return false;
        };
        match p.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => {
                let h = ip.header().to_header();
                h.header_checksum == h.calc_header_checksum()
                    && t.checksum() == t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
            }
            Some(etherparse::NetSlice::Ipv6(ip)) => {
                let h = ip.header().to_header();
                t.checksum() == t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap()
            }
            _ => false,
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn virtio_header_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 86,
            gso_size: 1348,
            csum_start: 54,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        h.emit(&mut b);
        assert_eq!(b, [1, 4, 86, 0, 0x44, 5, 54, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::parse(&b), Some(h));
        assert_eq!(VirtioNetHdr::parse(&b[..9]), None);
    }

    fn tso_frame(v6: bool, payload: &[u8], psh: bool) -> (VirtioNetHdr, Vec<u8>) {
        let frame = tcp(v6, 1000, 7, psh, payload);
        let lay = tcp_layout(&frame).unwrap();
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: if v6 {
                VirtioNetHdr::GSO_TCPV6
            } else {
                VirtioNetHdr::GSO_TCPV4
            },
            hdr_len: lay.headers as u16,
            gso_size: 1000,
            csum_start: lay.l4 as u16,
            csum_offset: 16,
        };
        (hdr, frame)
    }

    #[test]
    fn segments_tso_frames_with_valid_checksums() {
        for v6 in [false, true] {
            let payload = data(4500);
            let (hdr, mut frame) = tso_frame(v6, &payload, true);
            let mut segs: Vec<Vec<u8>> = Vec::new();
            let n = segment(&hdr, &mut frame, |h, p| segs.push([h, p].concat())).unwrap();
            assert_eq!(n, 5);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(checksums_ok(s), "v6={v6} segment {i}");
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(TransportSlice::Tcp(t)) = p.transport else {
                    panic!()
                };
                assert_eq!(t.sequence_number(), 1000 + 1000 * i as u32);
                assert_eq!(t.psh(), i == 4, "PSH only on the last");
                joined.extend_from_slice(t.payload());
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn completes_partial_checksum() {
        let mut frame = tcp(false, 1, 1, false, &data(100));
        let lay = tcp_layout(&frame).unwrap();
        // What the kernel hands over with checksum offload: the pseudo-header sum, folded.
        let partial = !pseudo_sum(&frame, lay, frame.len() - lay.l4).ones_complement();
        frame[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&partial.to_ne_bytes());
        assert!(!checksums_ok(&frame));
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            csum_start: lay.l4 as u16,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = Vec::new();
        segment(&hdr, &mut frame, |h, p| out = [h, p].concat()).unwrap();
        assert!(checksums_ok(&out));
    }

    #[test]
    fn rejects_malformed() {
        let (hdr, frame) = tso_frame(false, &data(3000), false);
        let mut short = frame[..40].to_vec();
        assert_eq!(
            segment(&hdr, &mut short, |_, _| {}),
            Err(SegmentError::Malformed)
        );
        let udp = VirtioNetHdr { gso_type: 5, ..hdr };
        assert_eq!(
            segment(&udp, &mut frame.clone(), |_, _| {}),
            Err(SegmentError::Unsupported(5))
        );
        let zero = VirtioNetHdr { gso_size: 0, ..hdr };
        assert_eq!(
            segment(&zero, &mut frame.clone(), |_, _| {}),
            Err(SegmentError::Malformed)
        );
    }

    /// Coalescing what segmentation made, then segmenting the result again, gives the same
    /// segments back.
    #[test]
    fn coalesce_then_segment_round_trip() {
        for v6 in [false, true] {
            let payload = data(9500);
            let (hdr, mut frame) = tso_frame(v6, &payload, true);
            let mut segs: Vec<Vec<u8>> = Vec::new();
            segment(&hdr, &mut frame, |h, p| segs.push([h, p].concat())).unwrap();
            let mut c = Coalescer::new();
            let mut written: Vec<Vec<u8>> = Vec::new();
            for s in &segs {
                c.push(s, &mut |b| written.push(b.to_vec()));
            }
            c.flush(&mut |b| written.push(b.to_vec()));
            assert_eq!(written.len(), 1, "v6={v6}: one merged write");
            let vh = VirtioNetHdr::parse(&written[0]).unwrap();
            assert_eq!(vh.gso_size, 1000);
            assert_eq!(vh.flags, VirtioNetHdr::F_NEEDS_CSUM);
            let mut merged = written[0][VirtioNetHdr::LEN..].to_vec();
            let mut again: Vec<Vec<u8>> = Vec::new();
            segment(&vh, &mut merged, |h, p| again.push([h, p].concat())).unwrap();
            assert_eq!(again, segs);
        }
    }

    #[test]
    fn does_not_merge_gaps_other_flows_or_control() {
        let mut c = Coalescer::new();
        let mut written: Vec<Vec<u8>> = Vec::new();
        let mut w = |b: &[u8]| written.push(b.to_vec());
        c.push(&tcp(false, 0, 1, false, &data(100)), &mut w);
        c.push(&tcp(false, 200, 2, false, &data(100)), &mut w); // gap: 100..200 missing
        c.push(&tcp(true, 300, 3, false, &data(100)), &mut w); // another flow
        let mut syn = tcp(false, 400, 4, false, &[]);
        syn[14 + 20 + 13] |= 0x02;
        c.push(&syn, &mut w);
        c.flush(&mut w);
        assert_eq!(written.len(), 4);
        for b in &written {
            assert_eq!(VirtioNetHdr::parse(b).unwrap(), VirtioNetHdr::default());
            assert!(checksums_ok(&b[VirtioNetHdr::LEN..]) || b.len() < 70);
        }
    }

    #[test]
    fn coalescer_never_panics_on_garbage() {
        use proptest::prelude::*;
        proptest!(|(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..8))| {
            let mut c = Coalescer::new();
            let mut n = 0;
            for f in &frames {
                c.push(f, &mut |_| n += 1);
            }
            c.flush(&mut |_| n += 1);
            prop_assert!(n <= frames.len());
        });
    }
}
