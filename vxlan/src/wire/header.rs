//! The VXLAN header, RFC 7348 §5.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |R|S|R|R|I|R|R|R|            Reserved                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! `I` (0x08 in the first byte) says the VNI is valid and must be set. RFC 7348 reserves every
//! other bit: zero on send, ignored on receive. shoal gives one of them a meaning on its own
//! networks: `S` (0x40 in the first byte) marks a sealed datagram, whose payload is the
//! envelope of [`super::envelope`] rather than an Ethernet frame. No published VXLAN extension
//! uses that bit (GBP uses 0x80, GPE 0x30/0x04/0x02/0x01), and the Linux kernel drops a datagram
//! with a flag it does not know, so a sealed datagram that strays to a kernel VTEP is dropped,
//! never decapsulated as garbage. All other reserved bits are ignored on receive.

use core::fmt;

use super::{Error, Vni};

/// Field offsets and flag values.
mod field {
    use core::ops::Range;

    pub(super) const FLAGS: usize = 0;
    pub(super) const VNI: Range<usize> = 4..7;
    pub(super) const LEN: usize = 8;

    /// VNI valid (RFC 7348).
    pub(super) const FLAG_I: u8 = 0x08;
    /// Sealed envelope follows (shoal).
    pub(super) const FLAG_S: u8 = 0x40;
}

/// Length of the VXLAN header in bytes.
pub const HEADER_LEN: usize = field::LEN;

/// A read/write view of a VXLAN header at the start of a buffer.
///
/// Build it with [`Header::new_checked`]; afterwards no accessor panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps `buffer` without any check. Accessors panic if it is shorter than
    /// [`HEADER_LEN`]; use [`Header::new_checked`] on untrusted bytes.
    pub const fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// Wraps `buffer` after checking that it holds a whole header with the `I` flag set.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let header = Self::new_unchecked(buffer);
        header.check()?;
        Ok(header)
    }

    /// Checks length and the `I` flag.
    pub fn check(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        if data.len() < field::LEN {
            return Err(Error::Truncated);
        }
        if data[field::FLAGS] & field::FLAG_I == 0 {
            return Err(Error::NoVni);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The VNI.
    pub fn vni(&self) -> Vni {
        let b = &self.buffer.as_ref()[field::VNI];
        Vni::from_bytes([b[0], b[1], b[2]])
    }

    /// Whether the `S` flag marks a sealed envelope.
    pub fn is_sealed(&self) -> bool {
        self.buffer.as_ref()[field::FLAGS] & field::FLAG_S != 0
    }

    /// The bytes after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Writes the flags byte and clears every reserved bit.
    fn set_flags(&mut self, sealed: bool) {
        let data = self.buffer.as_mut();
        data[field::FLAGS] = field::FLAG_I | if sealed { field::FLAG_S } else { 0 };
        data[1..4].fill(0);
        data[7] = 0;
    }

    /// Writes the VNI.
    fn set_vni(&mut self, vni: Vni) {
        self.buffer.as_mut()[field::VNI].copy_from_slice(&vni.to_bytes());
    }
}

/// The parsed meaning of a VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// The network.
    pub vni: Vni,
    /// Whether a sealed envelope follows (shoal's `S` flag).
    pub sealed: bool,
}

impl Repr {
    /// Reads a checked header.
    pub fn parse<T: AsRef<[u8]>>(header: &Header<T>) -> Self {
        Repr {
            vni: header.vni(),
            sealed: header.is_sealed(),
        }
    }

    /// Length of the emitted header.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header, reserved bits zero.
    ///
    /// # Panics
    /// If the buffer is shorter than [`HEADER_LEN`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, header: &mut Header<T>) {
        header.set_flags(self.sealed);
        header.set_vni(self.vni);
    }
}

impl fmt::Display for Repr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VXLAN vni={}", self.vni)?;
        if self.sealed {
            f.write_str(" sealed")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;
    use proptest::prelude::*;

    use super::*;

    const PLAIN_4096: [u8; 8] = hex!("08 00 00 00 00 10 00 00");

    #[test]
    fn parses_plain_header() {
        let h = Header::new_checked(&PLAIN_4096[..]).unwrap();
        assert_eq!(
            Repr::parse(&h),
            Repr {
                vni: Vni::new(4096).unwrap(),
                sealed: false
            }
        );
    }

    #[test]
    fn emits_plain_header() {
        let mut buf = [0xffu8; 8];
        let repr = Repr {
            vni: Vni::new(4096).unwrap(),
            sealed: false,
        };
        repr.emit(&mut Header::new_unchecked(&mut buf[..]));
        assert_eq!(buf, PLAIN_4096);
    }

    #[test]
    fn emits_sealed_flag() {
        let mut buf = [0u8; 8];
        let repr = Repr {
            vni: Vni::new(0xabcdef).unwrap(),
            sealed: true,
        };
        repr.emit(&mut Header::new_unchecked(&mut buf[..]));
        assert_eq!(buf, hex!("48 00 00 00 ab cd ef 00"));
    }

    #[test]
    fn ignores_reserved_bits_on_receive() {
        // GBP's G bit, the reserved bytes and the last byte all set: still VNI 4096, plain.
        let h = Header::new_checked(&hex!("88 ff ff ff 00 10 00 ff")[..]).unwrap();
        assert_eq!(h.vni().get(), 4096);
        assert!(!h.is_sealed());
    }

    #[test]
    fn rejects_short_and_flagless() {
        assert_eq!(
            Header::new_checked(&PLAIN_4096[..7]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Header::new_checked(&hex!("00 00 00 00 00 10 00 00")[..]).unwrap_err(),
            Error::NoVni
        );
    }

    proptest! {
        #[test]
        fn round_trip(vni in 0u32..=Vni::MAX, sealed: bool) {
            let repr = Repr { vni: Vni::new(vni).unwrap(), sealed };
            let mut buf = [0u8; HEADER_LEN];
            repr.emit(&mut Header::new_unchecked(&mut buf[..]));
            let parsed = Repr::parse(&Header::new_checked(&buf[..]).unwrap());
            prop_assert_eq!(parsed, repr);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(h) = Header::new_checked(&bytes[..]) {
                let _ = Repr::parse(&h);
                prop_assert_eq!(h.payload().len(), bytes.len() - HEADER_LEN);
            }
        }
    }
}
