//! Packet buffers with headroom and tailroom, so a frame is encapsulated and sealed where it
//! lies, and a batch of them for what the engine wants sent.
//!
//! Buffers are allocated once and recycled: [`Transmits`] keeps the buffers the caller has sent
//! and hands them back to the engine, so the steady state allocates nothing.

use std::net::SocketAddr;

use crate::wire::envelope::{HEADER_LEN, TAG_LEN};

/// Room kept before a frame: the VXLAN header plus the envelope header.
pub const HEADROOM: usize = HEADER_LEN;
/// Room kept after a frame: the AEAD tag.
pub const TAILROOM: usize = TAG_LEN;

/// One packet: either a frame with room around it, or a received datagram.
#[derive(Clone)]
pub struct Packet {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl core::fmt::Debug for Packet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Packet")
            .field("start", &self.start)
            .field("len", &(self.end - self.start))
            .finish()
    }
}

impl Packet {
    /// A buffer for frames of up to `max_frame` bytes (and so for datagrams of up to
    /// `max_frame + HEADROOM + TAILROOM`).
    pub fn new(max_frame: usize) -> Self {
        Packet {
            buf: vec![0u8; HEADROOM + max_frame + TAILROOM].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
        }
    }

    /// The largest frame this buffer takes.
    pub fn max_frame(&self) -> usize {
        self.buf.len() - HEADROOM - TAILROOM
    }

    /// The space where a frame is written (for example by a read from the TAP device); then
    /// call [`Packet::set_frame_len`].
    pub fn frame_space(&mut self) -> &mut [u8] {
        let end = self.buf.len() - TAILROOM;
        &mut self.buf[HEADROOM..end]
    }

    /// Marks the first `len` bytes of [`Packet::frame_space`] as the frame.
    ///
    /// # Panics
    /// If `len` exceeds [`Packet::max_frame`].
    pub fn set_frame_len(&mut self, len: usize) {
        assert!(len <= self.max_frame(), "frame longer than the buffer");
        self.start = HEADROOM;
        self.end = HEADROOM + len;
    }

    /// Copies `frame` in as the frame. Returns `false` (and changes nothing) if it does not fit.
    pub fn set_frame(&mut self, frame: &[u8]) -> bool {
        if frame.len() > self.max_frame() {
            return false;
        }
        self.frame_space()[..frame.len()].copy_from_slice(frame);
        self.set_frame_len(frame.len());
        true
    }

    /// Copies a frame given in two parts (headers and payload) in as the frame. Returns `false`
    /// (and changes nothing) if it does not fit.
    pub fn set_frame_parts(&mut self, head: &[u8], tail: &[u8]) -> bool {
        let len = head.len() + tail.len();
        if len > self.max_frame() {
            return false;
        }
        let space = self.frame_space();
        space[..head.len()].copy_from_slice(head);
        space[head.len()..len].copy_from_slice(tail);
        self.set_frame_len(len);
        true
    }

    /// The whole buffer, where a datagram is received (for example by `recv_from`); then call
    /// [`Packet::set_datagram_len`].
    pub fn datagram_space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Marks the first `len` bytes of the buffer as a received datagram.
    ///
    /// # Panics
    /// If `len` exceeds the buffer.
    pub fn set_datagram_len(&mut self, len: usize) {
        assert!(len <= self.buf.len(), "datagram longer than the buffer");
        self.start = 0;
        self.end = len;
    }

    /// Copies `datagram` in as a received datagram. Returns `false` if it does not fit.
    pub fn set_datagram(&mut self, datagram: &[u8]) -> bool {
        if datagram.len() > self.buf.len() {
            return false;
        }
        self.buf[..datagram.len()].copy_from_slice(datagram);
        self.set_datagram_len(datagram.len());
        true
    }

    /// The current contents: a frame, a datagram to send, or a received datagram.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Length of [`Packet::data`].
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether [`Packet::data`] is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Grows the contents by `head` bytes in front and `tail` behind, for encapsulation.
    /// Returns the grown contents, or `None` if the room is not there.
    pub(crate) fn grow(&mut self, head: usize, tail: usize) -> Option<&mut [u8]> {
        let start = self.start.checked_sub(head)?;
        let end = self
            .end
            .checked_add(tail)
            .filter(|&e| e <= self.buf.len())?;
        self.start = start;
        self.end = end;
        Some(&mut self.buf[start..end])
    }

    /// The contents, mutable.
    pub(crate) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }
}

/// A datagram the engine wants sent.
#[derive(Debug)]
pub struct Transmit {
    /// Underlay destination (VTEP address and data-path port).
    pub dst: SocketAddr,
    /// The datagram: the UDP payload.
    pub packet: Packet,
}

/// The engine's output queue: datagrams to send, and the spare buffers it fills them from.
#[derive(Debug)]
pub struct Transmits {
    ready: Vec<Transmit>,
    spare: Vec<Packet>,
    max_frame: usize,
}

impl Transmits {
    /// A queue whose buffers take frames up to `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Transmits {
            ready: Vec::new(),
            spare: Vec::new(),
            max_frame,
        }
    }

    /// The datagrams waiting to be sent.
    pub fn ready(&self) -> &[Transmit] {
        &self.ready
    }

    /// Number of datagrams waiting.
    pub fn len(&self) -> usize {
        self.ready.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Forgets the waiting datagrams (after they were sent) and keeps their buffers for reuse.
    pub fn clear(&mut self) {
        self.spare.extend(self.ready.drain(..).map(|t| t.packet));
    }

    /// Removes and returns the waiting datagrams; the caller may hand the buffers back with
    /// [`Transmits::recycle`].
    pub fn drain(&mut self) -> impl Iterator<Item = Transmit> + '_ {
        self.ready.drain(..)
    }

    /// Gives a buffer back for reuse.
    pub fn recycle(&mut self, packet: Packet) {
        self.spare.push(packet);
    }

    /// A spare buffer, or a new one while the pool warms up.
    pub(crate) fn take_spare(&mut self) -> Packet {
        self.spare
            .pop()
            .unwrap_or_else(|| Packet::new(self.max_frame))
    }

    pub(crate) fn push(&mut self, dst: SocketAddr, packet: Packet) {
        self.ready.push(Transmit { dst, packet });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_growth() {
        let mut p = Packet::new(100);
        assert!(p.set_frame(&[1, 2, 3]));
        assert_eq!(p.data(), &[1, 2, 3]);
        let grown = p.grow(HEADROOM, TAILROOM).unwrap();
        assert_eq!(grown.len(), HEADROOM + 3 + TAILROOM);
        assert_eq!(&grown[HEADROOM..HEADROOM + 3], &[1, 2, 3]);
        assert!(p.grow(1, 0).is_none(), "no headroom left");
        assert!(!p.set_frame(&[0; 101]));
        assert!(p.set_frame(&[0; 100]));
        assert!(p.grow(HEADROOM, TAILROOM).is_some());
    }

    #[test]
    fn datagram_and_parts() {
        let mut p = Packet::new(10);
        assert!(p.set_datagram(&[9; 50]));
        assert_eq!(p.len(), 50);
        assert!(p.set_frame_parts(&[1, 2], &[3]));
        assert_eq!(p.data(), &[1, 2, 3]);
        assert!(!p.set_frame_parts(&[0; 6], &[0; 5]));
        assert_eq!(p.data(), &[1, 2, 3]);
        assert!(p.set_datagram(&[0; HEADROOM + 10 + TAILROOM]));
        assert!(!p.set_datagram(&[0; HEADROOM + 10 + TAILROOM + 1]));
    }

    #[test]
    fn transmits_recycle_buffers() {
        let mut t = Transmits::new(64);
        let p = t.take_spare();
        let ptr = p.data().as_ptr() as usize;
        t.push("198.18.0.1:4789".parse().unwrap(), p);
        assert_eq!(t.len(), 1);
        t.clear();
        assert!(t.is_empty());
        let again = t.take_spare();
        assert_eq!(
            again.data().as_ptr() as usize,
            ptr,
            "the same buffer comes back"
        );
    }
}
