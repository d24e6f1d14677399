//! Wire formats: the RFC 7348 VXLAN header and shoal's sealed envelope.
//!
//! Each format is a checked view over caller bytes (`new_checked`, after which nothing panics)
//! plus a `Repr` with `parse` and `emit`, in the manner of smoltcp.

pub mod envelope;
pub mod header;

pub use envelope::Envelope;
pub use header::Header;

use core::fmt;

/// Why bytes are not a well-formed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than the headers (and tag) it claims to carry.
    #[error("datagram too short for its headers")]
    Truncated,
    /// The `I` flag is clear, so there is no valid VNI (RFC 7348 §5).
    #[error("VXLAN header without the I flag: no valid VNI")]
    NoVni,
    /// An envelope was expected but the `S` flag is clear.
    #[error("datagram is not sealed (S flag clear)")]
    NotSealed,
    /// A sealed envelope of a version this code does not speak.
    #[error("sealed envelope version {0} is not supported (this build speaks version 1)")]
    UnknownVersion(u8),
    /// A VNI above 2^24 - 1.
    #[error("VNI {0} does not fit in 24 bits (0 to 16777215)")]
    VniOutOfRange(u32),
}

/// A 24-bit VXLAN Network Identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI.
    pub const MAX: u32 = (1 << 24) - 1;

    /// Checks that `vni` fits in 24 bits.
    pub const fn new(vni: u32) -> Result<Self, Error> {
        if vni > Self::MAX {
            Err(Error::VniOutOfRange(vni))
        } else {
            Ok(Vni(vni))
        }
    }

    /// The number.
    pub const fn get(self) -> u32 {
        self.0
    }

    pub(crate) const fn from_bytes(b: [u8; 3]) -> Self {
        Vni(((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32)
    }

    pub(crate) const fn to_bytes(self) -> [u8; 3] {
        [(self.0 >> 16) as u8, (self.0 >> 8) as u8, self.0 as u8]
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Broadcast or multicast (the I/G bit of the first octet).
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The destination MAC of an Ethernet frame, if the frame holds one.
    pub fn dst_of(frame: &[u8]) -> Option<Mac> {
        frame
            .get(0..6)
            .map(|b| Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }

    /// The source MAC of an Ethernet frame, if the frame holds one.
    pub fn src_of(frame: &[u8]) -> Option<Mac> {
        frame
            .get(6..12)
            .map(|b| Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl core::str::FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or(ParseMacError)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(ParseMacError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError)?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError);
        }
        Ok(Mac(out))
    }
}

/// A MAC address that is not six colon-separated pairs of hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a MAC address: write six pairs of hex digits separated by colons, e.g. 02:42:0a:00:00:02"
)]
pub struct ParseMacError;

/// Length of an Ethernet header without VLAN tags.
pub const ETHERNET_HEADER_LEN: usize = 14;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn mac_text_round_trip(bytes: [u8; 6]) {
            let mac = Mac(bytes);
            prop_assert_eq!(mac.to_string().parse::<Mac>(), Ok(mac));
        }

        #[test]
        fn vni_bytes_round_trip(vni in 0u32..=Vni::MAX) {
            let v = Vni::new(vni).unwrap();
            prop_assert_eq!(Vni::from_bytes(v.to_bytes()), v);
        }
    }

    #[test]
    fn vni_bounds() {
        assert_eq!(Vni::new(Vni::MAX).unwrap().get(), 16_777_215);
        assert_eq!(
            Vni::new(1 << 24).unwrap_err(),
            Error::VniOutOfRange(1 << 24)
        );
        let v = Vni::new(0x01_02_03).unwrap();
        assert_eq!(Vni::from_bytes(v.to_bytes()), v);
    }

    #[test]
    fn mac_text() {
        let m: Mac = "02:42:0a:00:00:02".parse().unwrap();
        assert_eq!(m.0, [2, 0x42, 10, 0, 0, 2]);
        assert_eq!(m.to_string(), "02:42:0a:00:00:02");
        for bad in [
            "",
            "02:42:0a:00:00",
            "02:42:0a:00:00:02:03",
            "2:42:0a:00:00:02",
            "zz:42:0a:00:00:02",
            "+2:42:0a:00:00:02",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(Mac::BROADCAST.is_multicast());
        assert!(!m.is_multicast());
    }
}
