//! Who a member is: [`NodeId`], the foca [`Identity`] (node ID, advertise address, bump) and the
//! [`Metadata`] spread with the membership.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Length of a node ID: 25 lowercase base-36 characters, as docker's.
pub const NODE_ID_LEN: usize = 25;

/// Longest agent version string carried in [`Metadata`], in bytes.
pub const MAX_VERSION_LEN: usize = 32;

/// A node ID as issued by the control plane: exactly 25 characters from `0-9a-z`.
///
/// The all-zero ID `0000000000000000000000000` is reserved: it addresses "whoever listens
/// there" when joining through a seed address whose node ID is not known yet.
#[derive(Clone, Copy)]
pub struct NodeId([u8; NODE_ID_LEN]);

impl std::hash::Hash for NodeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The bytes, as a derive would: equal IDs have equal bytes.
        self.0.hash(state);
    }
}

impl NodeId {
    /// The 25 bytes as three big-endian words (16 + 8 + 1 bytes): comparing them compares
    /// the bytes in order, without a call to `memcmp` (foca compares node IDs in a scan of
    /// its member list for every update it applies).
    fn words(&self) -> (u128, u64, u8) {
        let b = &self.0;
        let mut hi = [0u8; 16];
        hi.copy_from_slice(&b[..16]);
        let mut mid = [0u8; 8];
        mid.copy_from_slice(&b[16..24]);
        (u128::from_be_bytes(hi), u64::from_be_bytes(mid), b[24])
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for NodeId {}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.words().cmp(&other.words())
    }
}

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// The string does not have exactly 25 characters.
    #[error(
        "node ID must be exactly 25 characters, got {0}; use the ID printed by `shoal node ls`"
    )]
    Length(usize),
    /// A character is outside `0-9a-z`.
    #[error("node ID may only hold lowercase letters and digits (0-9a-z); check for upper case or punctuation")]
    Charset,
}

impl NodeId {
    /// The reserved ID that addresses an unknown seed (see the type docs).
    pub const ANY: NodeId = NodeId([b'0'; NODE_ID_LEN]);

    /// Builds an ID from its 25 bytes, checking the character set.
    pub fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Result<Self, NodeIdError> {
        if bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        {
            Ok(NodeId(bytes))
        } else {
            Err(NodeIdError::Charset)
        }
    }

    /// Builds a node ID from a number, in base 36 padded with zeros (tests and the simulation).
    pub fn from_index(mut n: u128) -> Self {
        let mut out = [b'0'; NODE_ID_LEN];
        for slot in out.iter_mut().rev() {
            let digit = (n % 36) as u8;
            *slot = if digit < 10 {
                b'0' + digit
            } else {
                b'a' + digit - 10
            };
            n /= 36;
            if n == 0 {
                break;
            }
        }
        NodeId(out)
    }

    /// The 25 ASCII bytes.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        // Every constructor checks the bytes are ASCII; fall back to "" rather than panic.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes: [u8; NODE_ID_LEN] = s
            .as_bytes()
            .try_into()
            .map_err(|_| NodeIdError::Length(s.len()))?;
        NodeId::from_bytes(bytes)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.as_str())
    }
}

/// A member's identity inside foca: node ID, advertise address and a bump.
///
/// The node ID is the cluster-wide key (foca's `Addr`). The bump is renewed (incremented)
/// when the node learns it was declared down, so it rejoins at once with an identity that
/// wins over the old one; a restarted agent should start from a higher bump than it ever
/// used (the driver uses the wall clock in tenths of a second, modulo 2^32: see
/// [`crate::driver::wall_bump`]).
///
/// 48 bytes: the address is kept as its IP bytes, port and family (what the wire carries),
/// not as a `SocketAddr` (32 bytes with the IPv6 flow label and scope ID, which the wire
/// does not carry); every member record holds one, in every node's foca.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The control-plane node ID.
    pub id: NodeId,
    /// Where the node receives gossip (UDP and TCP); see [`Identity::socket_addr`].
    addr: PackedAddr,
    /// Generation counter, compared with wrap-around (serial number arithmetic).
    pub bump: u32,
}

/// A socket address as IP bytes (IPv4 in the first four), port and family.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PackedAddr {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl From<SocketAddr> for PackedAddr {
    fn from(a: SocketAddr) -> Self {
        let mut ip = [0u8; 16];
        let v6 = match a.ip() {
            IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                false
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                true
            }
        };
        PackedAddr {
            ip,
            port: a.port().to_be_bytes(),
            v6,
        }
    }
}

impl PackedAddr {
    fn get(&self) -> SocketAddr {
        let ip = if self.v6 {
            IpAddr::from(self.ip)
        } else {
            IpAddr::from([self.ip[0], self.ip[1], self.ip[2], self.ip[3]])
        };
        SocketAddr::new(ip, u16::from_be_bytes(self.port))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("addr", &self.socket_addr())
            .field("bump", &self.bump)
            .finish()
    }
}

impl Identity {
    /// A new identity. An IPv6 address's flow label and scope ID are not kept (the wire
    /// format does not carry them either).
    pub fn new(id: NodeId, addr: SocketAddr, bump: u32) -> Self {
        Identity {
            id,
            addr: addr.into(),
            bump,
        }
    }

    /// Where the node receives gossip (UDP and TCP).
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr.get()
    }

    /// Whether `self` is a later generation than `other` (serial number arithmetic, so a
    /// bump that wraps around still wins).
    pub fn newer_than(&self, other: &Identity) -> bool {
        (self.bump.wrapping_sub(other.bump) as i32) > 0
    }
}

impl foca::Identity for Identity {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Identity {
            bump: self.bump.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // Keep what we know unless the other one is a strictly later generation.
        !adversary.newer_than(self)
    }
}

/// A node's role in the swarm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs tasks only.
    Worker,
    /// Also takes part in managing the cluster.
    Manager,
}

/// What every node tells the others about itself, spread with the membership.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// Underlay address of the node's VXLAN endpoint.
    pub vtep: IpAddr,
    /// UDP port of the data path (4789 unless `--data-path-port`).
    pub data_port: u16,
    /// The node's static X25519 public key.
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
    /// The data path's incarnation: 16 random bytes the control plane draws at every start
    /// of the data path and mixes into the data-path keys, so a restarted node never reuses
    /// a nonce (the data-path envelope carries the first 4 bytes). Opaque to gossip.
    #[serde(default, with = "hex16")]
    pub incarnation: [u8; 16],
    /// Worker or manager.
    pub role: Role,
    /// Agent version string, at most [`MAX_VERSION_LEN`] bytes.
    pub version: String,
}

/// Why a [`Metadata`] value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The agent version string is too long.
    #[error("agent version is {0} bytes, at most 32 are allowed; shorten the version string")]
    VersionTooLong(usize),
}

impl Metadata {
    /// Checks the bounds the codec relies on.
    pub fn validate(&self) -> Result<(), MetadataError> {
        if self.version.len() > MAX_VERSION_LEN {
            return Err(MetadataError::VersionTooLong(self.version.len()));
        }
        Ok(())
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(64);
        for b in v {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::parse_hex32(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        let b = s.as_bytes();
        let mut out = [0u8; 16];
        if b.len() != 32 {
            return Err(serde::de::Error::custom("expected 32 hex digits"));
        }
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => out[i] = (hi * 16 + lo) as u8,
                _ => return Err(serde::de::Error::custom("expected 32 hex digits")),
            }
        }
        Ok(out)
    }
}

/// Parses 64 hex digits into 32 bytes (keys on command lines and in JSON).
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    #[test]
    fn node_id_parse_and_reject() {
        let id: NodeId = "abcdefghijklmnopqrstuvw12".parse().unwrap();
        assert_eq!(id.to_string(), "abcdefghijklmnopqrstuvw12");
        assert_eq!(
            "ABCDEFGHIJKLMNOPQRSTUVW12".parse::<NodeId>(),
            Err(NodeIdError::Charset)
        );
        assert_eq!("abc".parse::<NodeId>(), Err(NodeIdError::Length(3)));
        assert_eq!(NodeId::from_index(0), NodeId::ANY);
        assert_eq!(NodeId::from_index(37).as_str(), "0000000000000000000000011");
    }

    #[test]
    fn node_id_order_and_equality_are_the_bytes() {
        let ids: Vec<NodeId> = [
            "0000000000000000000000000",
            "000000000000000000000000z",
            "00000000000000000000000z0",
            "0000000000000000z00000000",
            "000000000000000z000000000",
            "z00000000000000000000000a",
            "zzzzzzzzzzzzzzzzzzzzzzzzz",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for a in &ids {
            for b in &ids {
                assert_eq!(a.cmp(b), a.as_bytes().cmp(b.as_bytes()), "{a} {b}");
                assert_eq!(a == b, a.as_bytes() == b.as_bytes());
            }
        }
    }

    #[test]
    fn renewed_identity_wins_even_across_wrap() {
        let addr: SocketAddr = "198.18.0.1:7946".parse().unwrap();
        let old = Identity::new(NodeId::from_index(5), addr, u32::MAX);
        let new = old.renew().unwrap();
        assert_eq!(new.bump, 0);
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
        // equal generation: keep the known one
        let other = Identity::new(old.id, "198.18.0.2:7946".parse().unwrap(), old.bump);
        assert!(old.win_addr_conflict(&other));
    }

    #[test]
    fn address_kept_compactly_round_trips() {
        assert_eq!(size_of::<Identity>(), 48);
        for a in [
            "198.18.0.1:7946",
            "[2001:db8::1]:7946",
            "[::ffff:198.18.0.1]:1",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let id = Identity::new(NodeId::from_index(1), a, 3);
            assert_eq!(id.socket_addr(), a);
        }
        // An IPv4 address and its IPv4-mapped IPv6 form stay different identities.
        let v4 = Identity::new(NodeId::ANY, "198.18.0.1:1".parse().unwrap(), 0);
        let v6 = Identity::new(NodeId::ANY, "[::ffff:198.18.0.1]:1".parse().unwrap(), 0);
        assert_ne!(v4, v6);
        assert_eq!(
            format!("{v4:?}"),
            "Identity { id: NodeId(0000000000000000000000000), addr: 198.18.0.1:1, bump: 0 }"
        );
    }

    #[test]
    fn hex32_round_trip() {
        let s = "00ff".repeat(16);
        let k = parse_hex32(&s).unwrap();
        assert_eq!(k[1], 0xff);
        assert!(parse_hex32("zz").is_none());
        assert!(parse_hex32(&"g".repeat(64)).is_none());
    }
}
