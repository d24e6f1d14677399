//! shoal's sealed envelope, version 2: a VXLAN datagram whose payload is an encrypted Ethernet
//! frame. `docs/wire.md` describes it byte by byte.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |0|1|0|0|1|0|0|0|            Reserved (0)                       |  VXLAN header,
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  I and S flags
//! |                VXLAN Network Identifier (VNI) | Reserved (0)  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Version (2)  |              Reserved (0)                     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       Key epoch (u32)                         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |              Sender incarnation tag (u32)                     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                       Counter (u64)                           +
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Ciphertext (the Ethernet frame) ...           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                   Tag (16 bytes, Poly1305)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! All integers are big-endian. The first 28 bytes are the AEAD's associated data, so the VNI,
//! the epoch, the incarnation tag and the counter are all authenticated. The tag is the first
//! four bytes of the sender's 16-byte incarnation, which is drawn afresh at every start of its
//! data path and is part of the key derivation (see `crate::crypto`), so a restarted sender
//! never reuses a (key, counter) pair. The nonce is four zero bytes followed by the counter
//! (RFC 8439 §2.8 takes a 96-bit nonce).
//!
//! Version 1 had the same layout and derived its keys without node IDs and from 4-byte
//! incarnations; a version-2 receiver drops version-1 datagrams as `unknown_version`, and a
//! version-1 receiver drops version-2 ones the same way. Both ends of a pair must run the same
//! version: upgrade every node before traffic flows again.

use super::{header, Error, Vni};

mod field {
    use core::ops::Range;

    pub(super) const VERSION: usize = 8;
    pub(super) const RESERVED: Range<usize> = 9..12;
    pub(super) const EPOCH: Range<usize> = 12..16;
    pub(super) const INCARNATION: Range<usize> = 16..20;
    pub(super) const COUNTER: Range<usize> = 20..28;
    pub(super) const PAYLOAD: usize = 28;
}

/// The envelope version this code writes and reads.
pub const VERSION: u8 = 2;
/// Bytes before the ciphertext: VXLAN header plus envelope header. All of them are associated data.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// Length of the Poly1305 tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes an encrypted datagram adds to a plain VXLAN datagram carrying the same frame.
pub const OVERHEAD_OVER_PLAIN: usize = HEADER_LEN - header::HEADER_LEN + TAG_LEN;

/// A view of a sealed datagram, from its VXLAN header to its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Envelope<T> {
    /// Wraps `buffer` without any check.
    pub const fn new_unchecked(buffer: T) -> Self {
        Envelope { buffer }
    }

    /// Wraps `buffer` after checking the VXLAN header (`I` and `S` flags), the version and that
    /// the buffer holds at least the headers and a tag.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let env = Self::new_unchecked(buffer);
        env.check()?;
        Ok(env)
    }

    /// The checks of [`Envelope::new_checked`].
    pub fn check(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        let h = header::Header::new_checked(data)?;
        if !h.is_sealed() {
            return Err(Error::NotSealed);
        }
        if data.len() <= field::VERSION {
            return Err(Error::Truncated);
        }
        if data[field::VERSION] != VERSION {
            return Err(Error::UnknownVersion(data[field::VERSION]));
        }
        if data.len() < HEADER_LEN + TAG_LEN {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The VNI from the VXLAN header.
    pub fn vni(&self) -> Vni {
        header::Header::new_unchecked(self.buffer.as_ref()).vni()
    }

    /// The key epoch the datagram was sealed under.
    pub fn epoch(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::EPOCH];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The sender's incarnation tag (the first four bytes of the incarnation it drew at the
    /// start of its data path).
    pub fn incarnation(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::INCARNATION];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The sender's counter, which is also the nonce.
    pub fn counter(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buffer.as_ref()[field::COUNTER]);
        u64::from_be_bytes(b)
    }

    /// Length of the ciphertext (the frame, once opened).
    pub fn ciphertext_len(&self) -> usize {
        self.buffer.as_ref().len() - HEADER_LEN - TAG_LEN
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Envelope<T> {
    /// Splits the datagram into (associated data, ciphertext, tag), the ciphertext mutable so it
    /// can be opened in place.
    pub fn split_mut(&mut self) -> (&[u8], &mut [u8], &[u8]) {
        let data = self.buffer.as_mut();
        let (aad, rest) = data.split_at_mut(HEADER_LEN);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        (aad, ct, tag)
    }
}

/// The meaning of an envelope's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// The network.
    pub vni: Vni,
    /// The key epoch.
    pub epoch: u32,
    /// The sender's incarnation tag.
    pub incarnation: u32,
    /// The sender's counter (the nonce).
    pub counter: u64,
}

impl Repr {
    /// Reads a checked envelope.
    pub fn parse<T: AsRef<[u8]>>(env: &Envelope<T>) -> Self {
        Repr {
            vni: env.vni(),
            epoch: env.epoch(),
            incarnation: env.incarnation(),
            counter: env.counter(),
        }
    }

    /// Length of a sealed datagram carrying `frame_len` bytes.
    pub const fn buffer_len(frame_len: usize) -> usize {
        HEADER_LEN + frame_len + TAG_LEN
    }

    /// Writes the VXLAN and envelope headers into the first [`HEADER_LEN`] bytes of `buf`,
    /// reserved bytes zero. The ciphertext and tag are the sealer's to write.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        header::Repr {
            vni: self.vni,
            sealed: true,
        }
        .emit(&mut header::Header::new_unchecked(
            &mut buf[..header::HEADER_LEN],
        ));
        buf[field::VERSION] = VERSION;
        buf[field::RESERVED].fill(0);
        buf[field::EPOCH].copy_from_slice(&self.epoch.to_be_bytes());
        buf[field::INCARNATION].copy_from_slice(&self.incarnation.to_be_bytes());
        buf[field::COUNTER].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// The 96-bit AEAD nonce for this counter: four zero bytes, then the counter big-endian.
    pub fn nonce(counter: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        n
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn golden_header() {
        let repr = Repr {
            vni: Vni::new(4096).unwrap(),
            epoch: 7,
            incarnation: 0x0a0b_0c0d,
            counter: 0x0102_0304_0506_0708,
        };
        let mut buf = [0xeeu8; HEADER_LEN + TAG_LEN];
        repr.emit(&mut buf);
        assert_eq!(
            buf[..HEADER_LEN],
            hex!("48 00 00 00 00 10 00 00  02 00 00 00 00 00 00 07  0a 0b 0c 0d  01 02 03 04 05 06 07 08")
        );
        let env = Envelope::new_checked(&buf[..]).unwrap();
        assert_eq!(Repr::parse(&env), repr);
        assert_eq!(env.ciphertext_len(), 0);
        assert_eq!(Repr::nonce(repr.counter), hex!("00000000 0102030405060708"));
    }

    #[test]
    fn checks() {
        let mut buf = [0u8; HEADER_LEN + TAG_LEN];
        Repr {
            vni: Vni::new(1).unwrap(),
            epoch: 1,
            incarnation: 1,
            counter: 1,
        }
        .emit(&mut buf);
        assert!(Envelope::new_checked(&buf[..]).is_ok());
        assert_eq!(
            Envelope::new_checked(&buf[..HEADER_LEN + TAG_LEN - 1]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Envelope::new_checked(&buf[..8]).unwrap_err(),
            Error::Truncated
        );
        // Version 1 (keys without node IDs) and any other version: refused.
        for other in [0, 1, 3, 0xff] {
            let mut v = buf;
            v[8] = other;
            assert_eq!(
                Envelope::new_checked(&v[..]).unwrap_err(),
                Error::UnknownVersion(other)
            );
        }
        let mut plain = buf;
        plain[0] = 0x08;
        assert_eq!(
            Envelope::new_checked(&plain[..]).unwrap_err(),
            Error::NotSealed
        );
    }

    proptest! {
        #[test]
        fn round_trip(vni in 0u32..=Vni::MAX, epoch: u32, incarnation: u32, counter: u64, len in 0usize..64) {
            let repr = Repr { vni: Vni::new(vni).unwrap(), epoch, incarnation, counter };
            let mut buf = vec![0u8; Repr::buffer_len(len)];
            repr.emit(&mut buf);
            let env = Envelope::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(Repr::parse(&env), repr);
            prop_assert_eq!(env.ciphertext_len(), len);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(mut env) = Envelope::new_checked(bytes.clone()) {
                let _ = Repr::parse(&env);
                let (aad, ct, tag) = env.split_mut();
                prop_assert_eq!(aad.len() + ct.len() + tag.len(), bytes.len());
            }
        }
    }
}
