//! Node IDs and the base-36 text form shared with join tokens.
//!
//! A node ID is 25 lowercase base-36 characters: a 128-bit random number written in base 36
//! and zero-padded, as docker swarm writes its node IDs. The random number is an input, so
//! the code here has no randomness of its own.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Number of characters in a node ID and in a join-token secret.
pub const ID_LEN: usize = 25;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Writes `value` in lowercase base 36, zero-padded on the left to `width` characters.
///
/// `value` is a big-endian unsigned integer of any length. If the number needs more than
/// `width` digits, all of them are written.
pub fn encode_base36(value: &[u8], width: usize) -> String {
    let mut num: Vec<u8> = value.to_vec();
    let mut digits = Vec::with_capacity(width.max(64));
    while num.iter().any(|b| *b != 0) {
        // One long division of the big-endian number by 36.
        let mut rem: u32 = 0;
        for byte in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*byte);
            *byte = (cur / 36) as u8;
            rem = cur % 36;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    digits.into_iter().map(char::from).collect()
}

/// Reads lowercase base 36 into a big-endian integer of exactly `N` bytes.
///
/// Returns `None` if a character is not in `[0-9a-z]` or the number does not fit in `N` bytes.
pub fn decode_base36<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for ch in text.bytes() {
        let digit = match ch {
            b'0'..=b'9' => ch - b'0',
            b'a'..=b'z' => ch - b'a' + 10,
            _ => return None,
        };
        // out = out * 36 + digit
        let mut carry = u32::from(digit);
        for byte in out.iter_mut().rev() {
            let cur = u32::from(*byte) * 36 + carry;
            *byte = (cur & 0xff) as u8;
            carry = cur >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// True if every character is a lowercase base-36 digit.
pub fn is_base36(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// A node's ID: 25 lowercase base-36 characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// A string that is not a node ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node ID {0:?}: a node ID is 25 lowercase letters and digits")]
pub struct InvalidNodeId(pub String);

impl NodeId {
    /// The ID made from 128 random bits (pass them from a CSPRNG).
    pub fn from_random(bits: u128) -> Self {
        Self(encode_base36(&bits.to_be_bytes(), ID_LEN))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID's 25 ASCII bytes (what the data path's key derivation takes).
    pub fn bytes(&self) -> [u8; ID_LEN] {
        let mut out = [b'0'; ID_LEN];
        // Every constructor checks the length is ID_LEN.
        out.copy_from_slice(&self.0.as_bytes()[..ID_LEN]);
        out
    }
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        if value.len() == ID_LEN && is_base36(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidNodeId(value))
        }
    }
}

impl std::str::FromStr for NodeId {
    type Err = InvalidNodeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_golden() {
        assert_eq!(encode_base36(&[0], 3), "000");
        assert_eq!(encode_base36(&[35], 1), "z");
        assert_eq!(encode_base36(&[36], 1), "10");
        assert_eq!(encode_base36(&0xffff_u16.to_be_bytes(), 0), "1ekf");
        assert_eq!(NodeId::from_random(0).as_str(), "0000000000000000000000000");
        // u128::MAX in base 36 is 25 digits: ID_LEN is exactly enough.
        assert_eq!(
            NodeId::from_random(u128::MAX).as_str(),
            "f5lxx1zz5pnorynqglhzmsp33"
        );
    }

    #[test]
    fn base36_round_trip() {
        for v in [
            0u128,
            1,
            35,
            36,
            1295,
            0xdead_beef,
            u128::MAX / 3,
            u128::MAX,
        ] {
            let text = encode_base36(&v.to_be_bytes(), ID_LEN);
            let back: [u8; 16] = decode_base36(&text).unwrap();
            assert_eq!(u128::from_be_bytes(back), v);
        }
    }

    #[test]
    fn base36_decode_refuses_overflow_and_charset() {
        assert!(decode_base36::<16>("f5lxx1zz5pnorynqglhzmsp34").is_none());
        assert!(decode_base36::<1>("74").is_none()); // 256
        assert_eq!(decode_base36::<1>("73"), Some([255]));
        assert!(decode_base36::<4>("AB").is_none());
        assert!(decode_base36::<4>("a-b").is_none());
    }

    #[test]
    fn node_id_validation() {
        assert!("0123456789abcdefghijklmno".parse::<NodeId>().is_ok());
        assert!("0123456789abcdefghijklmn".parse::<NodeId>().is_err());
        assert!("0123456789abcdefghijklmnop".parse::<NodeId>().is_err());
        assert!("0123456789ABCDEFGHIJKLMNO".parse::<NodeId>().is_err());
        let json = serde_json::to_string(&NodeId::from_random(7)).unwrap();
        assert_eq!(json, "\"0000000000000000000000007\"");
        assert!(serde_json::from_str::<NodeId>("\"short\"").is_err());
    }
}
