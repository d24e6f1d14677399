//! The versioned wire codec for what travels inside the sealed envelope.
//!
//! Layouts (all integers big-endian):
//!
//! ```text
//! identity  = node_id[25] family(4|6) ip[4|16] port u16 bump u32
//! header    = version(1) src:identity src_incarnation u16 dst:identity message
//! message   = tag u8 [probe u8 | identity probe u8]      (see `Tag`)
//! member    = identity incarnation u16 state u8          (0 alive, 1 suspect, 2 down)
//! item      = 1 record | 2 subject:identity incarnation u16 from:node_id[25] sig[64]
//!           | 3 entry
//! record    = subject:identity incarnation u16 seq u64 flags u8 meta sig[64]   (node record)
//! meta      = family ip port u16 incarnation[16] role u8 len u8 version[len]
//! entry     = author:node_id[25] klen u8 key[klen] version u64 flags u8
//!             [vlen u16 value[vlen]] sig[64]          (flags 1: a value follows; 0: tombstone)
//! state     = version(3) count u32 (kind u8 1 record)* count u32 member*   (push-pull)
//!             kind 1: the record only; kind 2: the record and an alive member entry at
//!             exactly its identity and incarnation (not listed again)
//!           | version(4) (the same) count u32 entry*  (count >= 1, entries in strictly
//!             increasing (author, key) order; a state without entries is version 3)
//! ```
//!
//! Signatures (Ed25519, by the node the item speaks for; see [`NodeRecord::signed_bytes`],
//! [`suspect_signed_bytes`] and [`Entry::signed_bytes`]):
//!
//! ```text
//! record    signs "shoal gossip node v1" subject incarnation seq flags x25519[32] meta
//! witness   signs "shoal gossip suspect v1" subject incarnation from
//! entry     signs "shoal gossip entry v1" author klen key version flags [vlen value]
//! ```
//!
//! Compatibility: entries came after version 3. An agent that predates them drops a datagram's
//! items from the first entry on (its `dropped_decode`; records and witnesses go first in
//! every datagram) and refuses a version-4 state; a state with no entries is still version 3,
//! byte for byte, so a cluster that does not use entries upgrades node by node.
//!
//! A foca datagram is `header [count u16 member*] [(len u16 item)*]`; foca itself frames the
//! updates and the custom broadcasts. Decoding never panics: every read is bounds checked and
//! every error is a [`DecodeError`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::{Buf, BufMut};
use foca::{Header, Member, Message, State};

use crate::auth::{Crypto, Sig, SIGNATURE_LEN};
use crate::identity::{Identity, Metadata, NodeId, Role, MAX_VERSION_LEN, NODE_ID_LEN};

/// Version byte that starts every header and every push-pull state. 3: envelopes sealed per
/// pair of nodes with a sender tag, signed node records and witnesses (2: one cluster key,
/// unsigned metadata items; 1 had a random nonce prefix). An agent speaking 2 cannot open a
/// version-3 envelope (nor the other way round): each counts the other's datagrams as
/// `dropped_seal` and the two never see each other up; upgrade every node.
pub const VERSION: u8 = 3;

/// Largest member count a push-pull state may announce (bounds allocation on decode).
pub const MAX_STATE_ENTRIES: u32 = 100_000;

/// Version byte of a push-pull state that carries entries (see the module docs). Headers
/// and states without entries stay at [`VERSION`].
pub const STATE_VERSION_ENTRIES: u8 = 4;

/// Largest entry count a push-pull state may announce (bounds allocation on decode).
pub const MAX_DUMP_ENTRIES: u32 = 1 << 20;

/// Longest entry key, in bytes.
pub const MAX_ENTRY_KEY: usize = 64;

/// Longest entry value, in bytes.
pub const MAX_ENTRY_VALUE: usize = 512;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("gossip message truncated; the sender may run a broken or different agent")]
    Truncated,
    /// The version byte is not one this agent speaks.
    #[error("gossip codec version {0} is not supported (this agent speaks {VERSION}); upgrade the older agents")]
    Version(u8),
    /// An enum tag (message, state, family, role, item kind) is unknown.
    #[error("unknown {what} tag {tag} in gossip message; the sender may run a newer agent")]
    Tag {
        /// Which field.
        what: &'static str,
        /// The value found.
        tag: u8,
    },
    /// A node ID holds characters outside `0-9a-z`.
    #[error("node ID in gossip message is not 25 lowercase base-36 characters")]
    NodeId,
    /// A length is larger than the codec allows.
    #[error("gossip message field too long: {0}")]
    TooLong(&'static str),
    /// Bytes are left after a value that must fill its buffer.
    #[error("gossip message has {0} trailing bytes")]
    Trailing(usize),
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer is too small; nothing was written.
    #[error("gossip message does not fit in the packet; this is a bug, please report it")]
    NoSpace,
}

/// A bounds-checked reader over a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
}

fn ip_len(ip: &IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 1 + 4,
        IpAddr::V6(_) => 1 + 16,
    }
}

fn put_ip(buf: &mut impl BufMut, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            buf.put_u8(4);
            buf.put_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            buf.put_u8(6);
            buf.put_slice(&v6.octets());
        }
    }
}

fn get_ip(r: &mut Reader<'_>) -> Result<IpAddr, DecodeError> {
    match r.u8()? {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(r.array::<4>()?))),
        6 => Ok(IpAddr::V6(Ipv6Addr::from(r.array::<16>()?))),
        tag => Err(DecodeError::Tag {
            what: "address family",
            tag,
        }),
    }
}

fn get_node_id(r: &mut Reader<'_>) -> Result<NodeId, DecodeError> {
    NodeId::from_bytes(r.array::<NODE_ID_LEN>()?).map_err(|_| DecodeError::NodeId)
}

/// Encoded length of an identity.
pub fn identity_len(id: &Identity) -> usize {
    NODE_ID_LEN + ip_len(&id.socket_addr().ip()) + 2 + 4
}

/// Writes an identity (the caller checked the space).
pub fn put_identity(buf: &mut impl BufMut, id: &Identity) {
    buf.put_slice(id.id.as_bytes());
    put_ip(buf, &id.socket_addr().ip());
    buf.put_u16(id.socket_addr().port());
    buf.put_u32(id.bump);
}

pub(crate) fn get_identity(r: &mut Reader<'_>) -> Result<Identity, DecodeError> {
    let id = get_node_id(r)?;
    let ip = get_ip(r)?;
    let port = r.u16()?;
    let bump = r.u32()?;
    Ok(Identity::new(id, SocketAddr::new(ip, port), bump))
}

/// Encoded length of a member.
pub fn member_len(m: &Member<Identity>) -> usize {
    identity_len(m.id()) + 3
}

pub(crate) fn put_member(buf: &mut impl BufMut, m: &Member<Identity>) {
    put_identity(buf, m.id());
    buf.put_u16(m.incarnation());
    buf.put_u8(match m.state() {
        State::Alive => 0,
        State::Suspect => 1,
        State::Down => 2,
    });
}

pub(crate) fn get_member(r: &mut Reader<'_>) -> Result<Member<Identity>, DecodeError> {
    let id = get_identity(r)?;
    let inc = r.u16()?;
    let state = match r.u8()? {
        0 => State::Alive,
        1 => State::Suspect,
        2 => State::Down,
        tag => {
            return Err(DecodeError::Tag {
                what: "member state",
                tag,
            })
        }
    };
    Ok(Member::new(id, inc, state))
}

fn message_len(m: &Message<Identity>) -> usize {
    match m {
        Message::Ping(_) | Message::Ack(_) => 2,
        Message::PingReq { target: i, .. }
        | Message::IndirectPing { origin: i, .. }
        | Message::IndirectAck { target: i, .. }
        | Message::ForwardedAck { origin: i, .. } => 2 + identity_len(i),
        _ => 1,
    }
}

/// The message tag of foca's `TurnUndead` ("you were declared down"), found in a header
/// right after `version src src_incarnation dst`.
pub const TAG_TURN_UNDEAD: u8 = 10;

/// Encoded length of a header.
pub fn header_len(h: &Header<Identity>) -> usize {
    1 + identity_len(&h.src) + 2 + identity_len(&h.dst) + message_len(&h.message)
}

pub(crate) fn put_header(buf: &mut impl BufMut, h: &Header<Identity>) {
    buf.put_u8(VERSION);
    put_identity(buf, &h.src);
    buf.put_u16(h.src_incarnation);
    put_identity(buf, &h.dst);
    let (tag, with_id, probe) = match &h.message {
        Message::Ping(p) => (0, None, Some(*p)),
        Message::Ack(p) => (1, None, Some(*p)),
        Message::PingReq {
            target,
            probe_number,
        } => (2, Some(target), Some(*probe_number)),
        Message::IndirectPing {
            origin,
            probe_number,
        } => (3, Some(origin), Some(*probe_number)),
        Message::IndirectAck {
            target,
            probe_number,
        } => (4, Some(target), Some(*probe_number)),
        Message::ForwardedAck {
            origin,
            probe_number,
        } => (5, Some(origin), Some(*probe_number)),
        Message::Announce => (6, None, None),
        Message::Feed => (7, None, None),
        Message::Gossip => (8, None, None),
        Message::Broadcast => (9, None, None),
        Message::TurnUndead => (TAG_TURN_UNDEAD, None, None),
    };
    buf.put_u8(tag);
    if let Some(id) = with_id {
        put_identity(buf, id);
    }
    if let Some(p) = probe {
        buf.put_u8(p);
    }
}

pub(crate) fn get_header(r: &mut Reader<'_>) -> Result<Header<Identity>, DecodeError> {
    let v = r.u8()?;
    if v != VERSION {
        return Err(DecodeError::Version(v));
    }
    let src = get_identity(r)?;
    let src_incarnation = r.u16()?;
    let dst = get_identity(r)?;
    let tag = r.u8()?;
    let message = match tag {
        0 => Message::Ping(r.u8()?),
        1 => Message::Ack(r.u8()?),
        2..=5 => {
            let id = get_identity(r)?;
            let probe_number = r.u8()?;
            match tag {
                2 => Message::PingReq {
                    target: id,
                    probe_number,
                },
                3 => Message::IndirectPing {
                    origin: id,
                    probe_number,
                },
                4 => Message::IndirectAck {
                    target: id,
                    probe_number,
                },
                _ => Message::ForwardedAck {
                    origin: id,
                    probe_number,
                },
            }
        }
        6 => Message::Announce,
        7 => Message::Feed,
        8 => Message::Gossip,
        9 => Message::Broadcast,
        TAG_TURN_UNDEAD => Message::TurnUndead,
        tag => {
            return Err(DecodeError::Tag {
                what: "message",
                tag,
            })
        }
    };
    Ok(Header {
        src,
        src_incarnation,
        dst,
        message,
    })
}

/// Encodes a foca header into a fresh vector (tests, rewriting).
pub fn encode_header(h: &Header<Identity>) -> Vec<u8> {
    let mut v = Vec::with_capacity(header_len(h));
    put_header(&mut v, h);
    v
}

/// Decodes a foca header from the start of `data`, returning it and the bytes read.
pub fn decode_header(data: &[u8]) -> Result<(Header<Identity>, usize), DecodeError> {
    let mut r = Reader::new(data);
    let h = get_header(&mut r)?;
    Ok((h, data.len() - r.remaining()))
}

/// The [`foca::Codec`] implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct Codec;

impl foca::Codec<Identity> for Codec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<Identity>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        if buf.remaining_mut() < header_len(header) {
            return Err(CodecError::Encode(EncodeError::NoSpace));
        }
        put_header(&mut buf, header);
        Ok(())
    }

    fn decode_header(&mut self, mut buf: impl Buf) -> Result<Header<Identity>, Self::Error> {
        let mut r = Reader::new(buf.chunk());
        let h = get_header(&mut r)?;
        let used = buf.chunk().len() - r.remaining();
        buf.advance(used);
        Ok(h)
    }

    fn encode_member(
        &mut self,
        member: &Member<Identity>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        if buf.remaining_mut() < member_len(member) {
            return Err(CodecError::Encode(EncodeError::NoSpace));
        }
        put_member(&mut buf, member);
        Ok(())
    }

    fn decode_member(&mut self, mut buf: impl Buf) -> Result<Member<Identity>, Self::Error> {
        let mut r = Reader::new(buf.chunk());
        let m = get_member(&mut r)?;
        let used = buf.chunk().len() - r.remaining();
        buf.advance(used);
        Ok(m)
    }
}

/// The error foca sees from [`Codec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Decoding failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// A custom broadcast item spread by foca with the membership updates. Every kind is
/// signed by the node it speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// What a node says about itself (identity, incarnation, metadata), signed by it.
    Node(Arc<NodeRecord>),
    /// `from` probed `subject` itself and got no answer (Lifeguard's independent suspicion),
    /// signed by `from`.
    Suspect {
        /// The suspected member.
        subject: Identity,
        /// The incarnation that was suspected.
        incarnation: u16,
        /// Who suspects it.
        from: NodeId,
        /// `from`'s signature over [`suspect_signed_bytes`].
        sig: Sig,
    },
    /// An application entry of its author's table, signed by the author.
    Entry(Arc<Entry>),
}

/// Whether record sequence number `a` is later than `b`. A run's first record has the run's
/// bump in its upper 32 bits, and bumps wrap (serial number arithmetic, RFC 1982, as in
/// [`Identity::newer_than`](crate::Identity::newer_than)); so sequence numbers are compared
/// the same way: `a` is later when it is less than 2^63 ahead of `b`.
pub fn seq_after(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

/// What a node says about itself, signed by it with its Ed25519 key: its identity (address
/// and bump), its SWIM incarnation, its metadata and whether it is leaving. `seq` orders a
/// node's records (the later wins, see [`seq_after`]); the node raises it with every record
/// it makes. A node makes a new record whenever its identity, incarnation or metadata
/// changes, so the latest record of a node is the latest (bump, incarnation) it stated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node and its identity (address, bump).
    pub subject: Identity,
    /// Its SWIM incarnation.
    pub incarnation: u16,
    /// Version of this record; the later wins ([`seq_after`]).
    pub seq: u64,
    /// The node is leaving the cluster on purpose.
    pub leaving: bool,
    /// The metadata. The wire form leaves out `public_key`: a decoded record holds zeros
    /// there until the receiver fills in the key its directory names for the node. The
    /// signature covers that key, so a record is accepted only if its author signed the key
    /// the directory binds to it.
    pub meta: Metadata,
    /// The node's signature over [`NodeRecord::signed_bytes`].
    pub sig: Sig,
}

/// Domain separation of node records.
const NODE_DOMAIN: &[u8] = b"shoal gossip node v1";
/// Domain separation of suspicion witnesses.
const SUSPECT_DOMAIN: &[u8] = b"shoal gossip suspect v1";

impl NodeRecord {
    /// A record signed with `crypto` (our keys); `meta.public_key` must be our X25519 key.
    pub fn signed(
        subject: Identity,
        incarnation: u16,
        seq: u64,
        leaving: bool,
        meta: Metadata,
        crypto: &dyn Crypto,
    ) -> Self {
        let mut r = NodeRecord {
            subject,
            incarnation,
            seq,
            leaving,
            meta,
            sig: [0; SIGNATURE_LEN],
        };
        r.sig = crypto.sign(&r.signed_bytes(&r.meta.public_key));
        r
    }

    /// The bytes the signature covers: `"shoal gossip node v1" identity incarnation seq flags
    /// x25519[32] meta`, with `x25519` the node's public key (taken from the directory by a
    /// receiver, not from the record).
    pub fn signed_bytes(&self, x25519: &[u8; 32]) -> Vec<u8> {
        let mut v = Vec::with_capacity(NODE_DOMAIN.len() + 64 + meta_len(&self.meta));
        v.put_slice(NODE_DOMAIN);
        put_identity(&mut v, &self.subject);
        v.put_u16(self.incarnation);
        v.put_u64(self.seq);
        v.put_u8(u8::from(self.leaving));
        v.put_slice(x25519);
        put_meta(&mut v, &self.meta);
        v
    }

    /// Encoded length of the record as an item (tag included).
    pub fn item_len(&self) -> usize {
        1 + identity_len(&self.subject) + 2 + 8 + 1 + meta_len(&self.meta) + SIGNATURE_LEN
    }
}

/// The bytes a suspicion witness signs: `"shoal gossip suspect v1" subject:identity
/// incarnation from:node_id`.
pub fn suspect_signed_bytes(subject: &Identity, incarnation: u16, from: &NodeId) -> Vec<u8> {
    let mut v = Vec::with_capacity(SUSPECT_DOMAIN.len() + 64 + NODE_ID_LEN);
    v.put_slice(SUSPECT_DOMAIN);
    put_identity(&mut v, subject);
    v.put_u16(incarnation);
    v.put_slice(from.as_bytes());
    v
}

/// Why an entry cannot be made: it is larger than the codec carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The key is longer than [`MAX_ENTRY_KEY`].
    #[error(
        "gossip entry key of {0} bytes exceeds the {MAX_ENTRY_KEY}-byte limit; use a shorter key"
    )]
    KeyTooLong(usize),
    /// The value is longer than [`MAX_ENTRY_VALUE`].
    #[error("gossip entry value of {0} bytes exceeds the {MAX_ENTRY_VALUE}-byte limit; store less per entry")]
    ValueTooLong(usize),
}

/// One entry of a node's application table: `key` maps to `value` (`None`: deleted, a
/// tombstone) at `version`, signed by `author` with its Ed25519 key. Only the author makes
/// its entries; a receiver believes one only if the signature verifies under the key its
/// directory names for the author. For one (author, key), the higher version wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The node whose table this is (and who signed it).
    pub author: NodeId,
    /// The key, at most [`MAX_ENTRY_KEY`] bytes (opaque to gossip).
    pub key: Vec<u8>,
    /// The version the author gave it; the higher wins.
    pub version: u64,
    /// The value, at most [`MAX_ENTRY_VALUE`] bytes (opaque), or `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// The author's signature over [`Entry::signed_bytes`].
    pub sig: Sig,
}

/// Domain separation of entries.
const ENTRY_DOMAIN: &[u8] = b"shoal gossip entry v1";

/// Smallest encoded entry (empty key, tombstone), without an item tag.
const MIN_ENTRY_LEN: usize = NODE_ID_LEN + 1 + 8 + 1 + SIGNATURE_LEN;

impl Entry {
    /// Checks the sizes of a key and value against [`MAX_ENTRY_KEY`] and [`MAX_ENTRY_VALUE`].
    pub fn check(key: &[u8], value: Option<&[u8]>) -> Result<(), EntryError> {
        if key.len() > MAX_ENTRY_KEY {
            return Err(EntryError::KeyTooLong(key.len()));
        }
        match value {
            Some(v) if v.len() > MAX_ENTRY_VALUE => Err(EntryError::ValueTooLong(v.len())),
            _ => Ok(()),
        }
    }

    /// An entry of ours, signed with `crypto` (our keys).
    pub fn signed(
        author: NodeId,
        key: Vec<u8>,
        version: u64,
        value: Option<Vec<u8>>,
        crypto: &dyn Crypto,
    ) -> Result<Self, EntryError> {
        Entry::check(&key, value.as_deref())?;
        let mut e = Entry {
            author,
            key,
            version,
            value,
            sig: [0; SIGNATURE_LEN],
        };
        e.sig = crypto.sign(&e.signed_bytes());
        Ok(e)
    }

    /// The bytes the signature covers: `"shoal gossip entry v1"` then the entry as it
    /// travels, without its signature (`author klen key version flags [vlen value]`).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENTRY_DOMAIN.len() + self.body_len());
        v.put_slice(ENTRY_DOMAIN);
        self.put_body(&mut v);
        v
    }

    /// Whether the signature verifies under `ed25519` (the author's key, from the directory).
    pub fn verify(&self, ed25519: &[u8; 32], crypto: &dyn Crypto) -> bool {
        crypto.verify(ed25519, &self.signed_bytes(), &self.sig)
    }

    /// Whether this is a tombstone (a deleted key).
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Length of the entry without its signature (fields cut at their limits, as
    /// `put_body` writes them).
    fn body_len(&self) -> usize {
        let key = self.key.len().min(MAX_ENTRY_KEY);
        let value = self
            .value
            .as_ref()
            .map_or(0, |v| 2 + v.len().min(MAX_ENTRY_VALUE));
        NODE_ID_LEN + 1 + key + 8 + 1 + value
    }

    /// Encoded length without an item tag (as a push-pull state holds it).
    pub fn encoded_len(&self) -> usize {
        self.body_len() + SIGNATURE_LEN
    }

    /// Encoded length as an item (tag included).
    pub fn item_len(&self) -> usize {
        1 + self.encoded_len()
    }

    /// Writes the entry without its signature. The sizes were checked when it was made or
    /// decoded; longer fields would be cut, never written with a wrong length.
    fn put_body(&self, buf: &mut impl BufMut) {
        let key = &self.key[..self.key.len().min(MAX_ENTRY_KEY)];
        buf.put_slice(self.author.as_bytes());
        buf.put_u8(key.len() as u8);
        buf.put_slice(key);
        buf.put_u64(self.version);
        match &self.value {
            Some(v) => {
                let v = &v[..v.len().min(MAX_ENTRY_VALUE)];
                buf.put_u8(1);
                buf.put_u16(v.len() as u16);
                buf.put_slice(v);
            }
            None => buf.put_u8(0),
        }
    }

    fn put(&self, buf: &mut impl BufMut) {
        self.put_body(buf);
        buf.put_slice(&self.sig);
    }

    fn get(r: &mut Reader<'_>) -> Result<Entry, DecodeError> {
        let author = get_node_id(r)?;
        let klen = usize::from(r.u8()?);
        if klen > MAX_ENTRY_KEY {
            return Err(DecodeError::TooLong("entry key"));
        }
        let key = r.take(klen)?.to_vec();
        let version = r.u64()?;
        let value = match r.u8()? {
            0 => None,
            1 => {
                let vlen = usize::from(r.u16()?);
                if vlen > MAX_ENTRY_VALUE {
                    return Err(DecodeError::TooLong("entry value"));
                }
                Some(r.take(vlen)?.to_vec())
            }
            tag => {
                return Err(DecodeError::Tag {
                    what: "entry flags",
                    tag,
                })
            }
        };
        let sig = r.array::<SIGNATURE_LEN>()?;
        Ok(Entry {
            author,
            key,
            version,
            value,
            sig,
        })
    }
}

/// Whether a decoding error is an entry over the size limits (counted apart from other
/// decoding errors).
pub fn is_oversize_entry(e: &DecodeError) -> bool {
    matches!(e, DecodeError::TooLong("entry key" | "entry value"))
}

/// Encoded length of metadata (the public key is not on the wire).
pub fn meta_len(m: &Metadata) -> usize {
    ip_len(&m.vtep) + 2 + 16 + 1 + 1 + m.version.len().min(MAX_VERSION_LEN)
}

fn put_meta(buf: &mut impl BufMut, m: &Metadata) {
    put_ip(buf, &m.vtep);
    buf.put_u16(m.data_port);
    buf.put_slice(&m.incarnation);
    buf.put_u8(match m.role {
        Role::Worker => 0,
        Role::Manager => 1,
    });
    let v = &m.version.as_bytes()[..m.version.len().min(MAX_VERSION_LEN)];
    buf.put_u8(v.len() as u8);
    buf.put_slice(v);
}

fn get_meta(r: &mut Reader<'_>) -> Result<Metadata, DecodeError> {
    let vtep = get_ip(r)?;
    let data_port = r.u16()?;
    let incarnation = r.array::<16>()?;
    let role = match r.u8()? {
        0 => Role::Worker,
        1 => Role::Manager,
        tag => return Err(DecodeError::Tag { what: "role", tag }),
    };
    let len = r.u8()? as usize;
    if len > MAX_VERSION_LEN {
        return Err(DecodeError::TooLong("agent version"));
    }
    let version = String::from_utf8(r.take(len)?.to_vec())
        .map_err(|_| DecodeError::TooLong("agent version is not UTF-8"))?;
    Ok(Metadata {
        vtep,
        data_port,
        public_key: [0; 32],
        incarnation,
        role,
        version,
    })
}

fn put_record(buf: &mut impl BufMut, r: &NodeRecord) {
    buf.put_u8(1);
    put_identity(buf, &r.subject);
    buf.put_u16(r.incarnation);
    buf.put_u64(r.seq);
    buf.put_u8(u8::from(r.leaving));
    put_meta(buf, &r.meta);
    buf.put_slice(&r.sig);
}

impl Item {
    /// Encodes the item.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.put(&mut v);
        v
    }

    /// Encoded length.
    pub fn len(&self) -> usize {
        match self {
            Item::Node(r) => r.item_len(),
            Item::Suspect { subject, .. } => {
                1 + identity_len(subject) + 2 + NODE_ID_LEN + SIGNATURE_LEN
            }
            Item::Entry(e) => e.item_len(),
        }
    }

    /// Never: an item has at least its tag byte (for clippy's `len` without `is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    fn put(&self, buf: &mut impl BufMut) {
        match self {
            Item::Node(r) => put_record(buf, r),
            Item::Suspect {
                subject,
                incarnation,
                from,
                sig,
            } => {
                buf.put_u8(2);
                put_identity(buf, subject);
                buf.put_u16(*incarnation);
                buf.put_slice(from.as_bytes());
                buf.put_slice(sig);
            }
            Item::Entry(e) => {
                buf.put_u8(3);
                e.put(buf);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Item, DecodeError> {
        match r.u8()? {
            1 => Ok(Item::Node(Arc::new(get_record_body(r)?))),
            2 => {
                let subject = get_identity(r)?;
                let incarnation = r.u16()?;
                let from = get_node_id(r)?;
                let sig = r.array::<SIGNATURE_LEN>()?;
                Ok(Item::Suspect {
                    subject,
                    incarnation,
                    from,
                    sig,
                })
            }
            3 => Ok(Item::Entry(Arc::new(Entry::get(r)?))),
            tag => Err(DecodeError::Tag {
                what: "broadcast item",
                tag,
            }),
        }
    }

    /// Decodes one item that fills `data` exactly.
    pub fn decode(data: &[u8]) -> Result<Item, DecodeError> {
        let mut r = Reader::new(data);
        let item = Item::get(&mut r)?;
        if r.remaining() != 0 {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        Ok(item)
    }
}

fn get_record_body(r: &mut Reader<'_>) -> Result<NodeRecord, DecodeError> {
    let subject = get_identity(r)?;
    let incarnation = r.u16()?;
    let seq = r.u64()?;
    let flags = r.u8()?;
    if flags > 1 {
        return Err(DecodeError::Tag {
            what: "record flags",
            tag: flags,
        });
    }
    let meta = get_meta(r)?;
    let sig = r.array::<SIGNATURE_LEN>()?;
    Ok(NodeRecord {
        subject,
        incarnation,
        seq,
        leaving: flags == 1,
        meta,
        sig,
    })
}

/// A full membership state, as exchanged by push-pull.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateDump {
    /// Every member foca knows, down ones included.
    pub members: Vec<Member<Identity>>,
    /// Every signed node record known.
    pub records: Vec<Arc<NodeRecord>>,
    /// Every application entry known (tombstones included), at most one per (author, key);
    /// encoded in (author, key) order whatever their order here.
    pub entries: Vec<Arc<Entry>>,
}

/// Smallest encoded member (IPv4): what a member count can claim per remaining byte.
const MIN_MEMBER_LEN: usize = NODE_ID_LEN + 5 + 2 + 4 + 3;
/// Smallest encoded record (IPv4, empty version string).
const MIN_RECORD_LEN: usize = 1 + NODE_ID_LEN + 5 + 2 + 4 + 2 + 8 + 1 + 5 + 2 + 16 + 2 + 64;

/// A push-pull record whose member entry, if any, is in the member list.
const RECORD_ONLY: u8 = 1;
/// A push-pull record whose node the sender holds alive at exactly the record's identity
/// and incarnation: that member entry is not sent (it is most of them, and 39 bytes each).
const RECORD_ALIVE: u8 = 2;

impl StateDump {
    /// Encodes the state: the records, each saying whether it also stands for an alive
    /// member entry, then the member entries it does not stand for, then (version 4 only)
    /// the application entries in (author, key) order.
    pub fn encode(&self) -> Vec<u8> {
        let implied: HashMap<NodeId, usize> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state() == State::Alive)
            .map(|(i, m)| (m.id().id, i))
            .collect();
        let mut skip = vec![false; self.members.len()];
        let len = 9
            + self.members.iter().map(member_len).sum::<usize>()
            + self.records.iter().map(|r| 1 + r.item_len()).sum::<usize>()
            + self.entries_len();
        let mut v = Vec::with_capacity(len);
        v.put_u8(if self.entries.is_empty() {
            VERSION
        } else {
            STATE_VERSION_ENTRIES
        });
        v.put_u32(self.records.len() as u32);
        for r in &self.records {
            let alive = implied.get(&r.subject.id).copied().filter(|i| {
                let m = &self.members[*i];
                !skip[*i] && *m.id() == r.subject && m.incarnation() == r.incarnation
            });
            match alive {
                Some(i) => {
                    skip[i] = true;
                    v.put_u8(RECORD_ALIVE);
                }
                None => v.put_u8(RECORD_ONLY),
            }
            put_record(&mut v, r);
        }
        let rest = skip.iter().filter(|s| !**s).count();
        v.put_u32(rest as u32);
        for (m, _) in self.members.iter().zip(&skip).filter(|(_, s)| !**s) {
            put_member(&mut v, m);
        }
        if !self.entries.is_empty() {
            let mut sorted: Vec<&Arc<Entry>> = self.entries.iter().collect();
            sorted.sort_by(|a, b| (a.author, &a.key).cmp(&(b.author, &b.key)));
            v.put_u32(sorted.len() as u32);
            for e in sorted {
                e.put(&mut v);
            }
        }
        v
    }

    /// Bytes the entries add to the encoding (their count included; 0 without entries).
    pub fn entries_len(&self) -> usize {
        if self.entries.is_empty() {
            0
        } else {
            4 + self.entries.iter().map(|e| e.encoded_len()).sum::<usize>()
        }
    }

    /// Decodes a state that fills `data` exactly (version 3, or 4 with entries). Members a
    /// record stands for come after the listed ones. Only the canonical encoding decodes (a
    /// listed member that its node's record could have stood for, a version-4 state without
    /// entries, entries out of (author, key) order or repeated are errors).
    pub fn decode(data: &[u8]) -> Result<StateDump, DecodeError> {
        let mut r = Reader::new(data);
        let v = r.u8()?;
        if v != VERSION && v != STATE_VERSION_ENTRIES {
            return Err(DecodeError::Version(v));
        }
        let n = r.u32()?;
        if n > MAX_STATE_ENTRIES {
            return Err(DecodeError::TooLong("push-pull record count"));
        }
        // Never allocate more than the input can hold.
        let mut records = Vec::with_capacity((n as usize).min(r.remaining() / MIN_RECORD_LEN));
        let mut implied = Vec::new();
        // Per node: the record's identity and incarnation, and whether it stands for the
        // node's alive entry.
        let mut stands: HashMap<NodeId, (Identity, u16, bool)> = HashMap::new();
        for _ in 0..n {
            let tag = r.u8()?;
            if r.u8()? != 1 {
                return Err(DecodeError::Tag {
                    what: "push-pull record",
                    tag: 0,
                });
            }
            let rec = Arc::new(get_record_body(&mut r)?);
            let alive = match tag {
                RECORD_ONLY => false,
                RECORD_ALIVE => true,
                tag => {
                    return Err(DecodeError::Tag {
                        what: "push-pull record",
                        tag,
                    })
                }
            };
            if alive {
                implied.push(Member::new(rec.subject, rec.incarnation, State::Alive));
            }
            // One record per node (the newest one held): a repeat is not canonical.
            if stands
                .insert(rec.subject.id, (rec.subject, rec.incarnation, alive))
                .is_some()
            {
                return Err(DecodeError::Tag {
                    what: "push-pull record (repeated node)",
                    tag,
                });
            }
            records.push(rec);
        }
        let n = r.u32()?;
        if n > MAX_STATE_ENTRIES {
            return Err(DecodeError::TooLong("push-pull member count"));
        }
        let mut members =
            Vec::with_capacity((n as usize).min(r.remaining() / MIN_MEMBER_LEN) + implied.len());
        for _ in 0..n {
            let m = get_member(&mut r)?;
            if let Some((ident, inc, used)) = stands.get(&m.id().id) {
                // Canonical form: a record stands for its node's alive entry at exactly its
                // identity and incarnation whenever it can.
                if !*used && m.state() == State::Alive && m.id() == ident && m.incarnation() == *inc
                {
                    return Err(DecodeError::Tag {
                        what: "push-pull member (not canonical)",
                        tag: 0,
                    });
                }
            }
            members.push(m);
        }
        let entries = if v == STATE_VERSION_ENTRIES {
            get_entries(&mut r)?
        } else {
            Vec::new()
        };
        if r.remaining() != 0 {
            return Err(DecodeError::Trailing(r.remaining()));
        }
        members.extend(implied);
        Ok(StateDump {
            members,
            records,
            entries,
        })
    }
}

/// The entries of a version-4 state: at least one, in strictly increasing (author, key)
/// order (so none repeats).
fn get_entries(r: &mut Reader<'_>) -> Result<Vec<Arc<Entry>>, DecodeError> {
    let n = r.u32()?;
    if n == 0 {
        // Canonical form: a state without entries is version 3.
        return Err(DecodeError::Tag {
            what: "push-pull entry count (none in a version-4 state)",
            tag: 0,
        });
    }
    if n > MAX_DUMP_ENTRIES {
        return Err(DecodeError::TooLong("push-pull entry count"));
    }
    let mut entries: Vec<Arc<Entry>> =
        Vec::with_capacity((n as usize).min(r.remaining() / MIN_ENTRY_LEN));
    for _ in 0..n {
        let e = Entry::get(r)?;
        if let Some(last) = entries.last() {
            if (last.author, &last.key) >= (e.author, &e.key) {
                return Err(DecodeError::Tag {
                    what: "push-pull entry (out of order or repeated)",
                    tag: 0,
                });
            }
        }
        entries.push(Arc::new(e));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Codec as _;

    fn ident(n: u128, v6: bool) -> Identity {
        let addr: SocketAddr = if v6 {
            "[2001:db8::1]:7946".parse().unwrap()
        } else {
            "198.18.0.7:7946".parse().unwrap()
        };
        Identity::new(NodeId::from_index(n), addr, n as u32 * 7)
    }

    fn meta() -> Metadata {
        Metadata {
            vtep: "198.18.0.7".parse().unwrap(),
            data_port: 4789,
            public_key: [0; 32],
            incarnation: [0x11; 16],
            role: Role::Manager,
            version: "0.1.0".into(),
        }
    }

    fn record(keys: &crate::auth::NodeKeys) -> NodeRecord {
        let mut m = meta();
        m.public_key = keys.public().x25519;
        NodeRecord::signed(ident(8, false), 3, 1 << 40, true, m, keys)
    }

    fn all_messages() -> Vec<Message<Identity>> {
        vec![
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq {
                target: ident(3, true),
                probe_number: 3,
            },
            Message::IndirectPing {
                origin: ident(4, false),
                probe_number: 4,
            },
            Message::IndirectAck {
                target: ident(5, false),
                probe_number: 5,
            },
            Message::ForwardedAck {
                origin: ident(6, true),
                probe_number: 6,
            },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ]
    }

    #[test]
    fn header_round_trip_every_message() {
        for message in all_messages() {
            let h = Header {
                src: ident(1, false),
                src_incarnation: 77,
                dst: ident(2, true),
                message,
            };
            let bytes = encode_header(&h);
            assert_eq!(bytes.len(), header_len(&h));
            let (back, used) = decode_header(&bytes).unwrap();
            assert_eq!(back, h);
            assert_eq!(used, bytes.len());
            // every strict prefix is an error, never a panic
            for cut in 0..bytes.len() {
                assert!(decode_header(&bytes[..cut]).is_err(), "prefix {cut}");
            }
        }
    }

    #[test]
    fn header_golden_bytes() {
        let h = Header {
            src: Identity::new(NodeId::from_index(1), "198.18.0.1:7946".parse().unwrap(), 2),
            src_incarnation: 3,
            dst: Identity::new(NodeId::from_index(2), "198.18.0.2:7946".parse().unwrap(), 4),
            message: Message::Ping(5),
        };
        let mut want = vec![VERSION];
        want.extend_from_slice(b"0000000000000000000000001");
        want.extend_from_slice(&[4, 198, 18, 0, 1, 0x1f, 0x0a, 0, 0, 0, 2, 0, 3]);
        want.extend_from_slice(b"0000000000000000000000002");
        want.extend_from_slice(&[4, 198, 18, 0, 2, 0x1f, 0x0a, 0, 0, 0, 4, 0, 5]);
        assert_eq!(encode_header(&h), want);
    }

    #[test]
    fn bad_version_and_tags_rejected() {
        let h = Header {
            src: ident(1, false),
            src_incarnation: 1,
            dst: ident(2, false),
            message: Message::Gossip,
        };
        let mut bytes = encode_header(&h);
        bytes[0] = 9;
        assert_eq!(decode_header(&bytes), Err(DecodeError::Version(9)));
        let mut bytes = encode_header(&h);
        let last = bytes.len() - 1;
        bytes[last] = 99;
        assert!(matches!(
            decode_header(&bytes),
            Err(DecodeError::Tag {
                what: "message",
                ..
            })
        ));
        let mut bytes = encode_header(&h);
        bytes[1] = b'A';
        assert_eq!(decode_header(&bytes), Err(DecodeError::NodeId));
    }

    #[test]
    fn member_round_trip_through_foca_codec() {
        let mut c = Codec;
        for (i, state) in [State::Alive, State::Suspect, State::Down]
            .into_iter()
            .enumerate()
        {
            let m = Member::new(ident(i as u128 + 10, i == 1), 500, state);
            let mut buf = Vec::new();
            c.encode_member(&m, &mut buf).unwrap();
            assert_eq!(buf.len(), member_len(&m));
            let mut slice = &buf[..];
            assert_eq!(c.decode_member(&mut slice).unwrap(), m);
            assert!(slice.is_empty());
        }
        // no space: nothing written
        let m = Member::alive(ident(1, false));
        let mut small = [0u8; 10];
        let mut w = &mut small[..];
        assert!(c.encode_member(&m, &mut w).is_err());
        assert_eq!(small, [0u8; 10]);
    }

    #[test]
    fn items_and_state_round_trip() {
        let keys = crate::auth::NodeKeys::from_secret([5; 32]);
        let rec = record(&keys);
        let items = vec![
            Item::Node(Arc::new(rec.clone())),
            Item::Suspect {
                subject: ident(3, false),
                incarnation: 4,
                from: NodeId::from_index(9),
                sig: [0x5a; 64],
            },
        ];
        for i in &items {
            let b = i.encode();
            assert_eq!(b.len(), i.len());
            let back = Item::decode(&b).unwrap();
            match (&back, i) {
                // the public key is not on the wire: it comes back as zeros
                (Item::Node(got), Item::Node(sent)) => {
                    assert_eq!(got.meta.public_key, [0; 32]);
                    let mut want = NodeRecord::clone(sent);
                    want.meta.public_key = [0; 32];
                    assert_eq!(**got, want);
                    // and it verifies once the receiver puts the directory's key back
                    assert!(Crypto::verify(
                        &keys,
                        &keys.public().ed25519,
                        &got.signed_bytes(&keys.public().x25519),
                        &got.sig
                    ));
                    assert!(!Crypto::verify(
                        &keys,
                        &keys.public().ed25519,
                        &got.signed_bytes(&[1; 32]),
                        &got.sig
                    ));
                }
                _ => assert_eq!(&back, i),
            }
            for cut in 0..b.len() {
                assert!(Item::decode(&b[..cut]).is_err());
            }
        }
        let mut zeroed = rec.clone();
        zeroed.meta.public_key = [0; 32];
        let mut members: Vec<Member<Identity>> = (0..20)
            .map(|i| Member::new(ident(i, i % 2 == 0), i as u16, State::Alive))
            .collect();
        // the record's node alive at exactly its identity and incarnation: not listed
        members.push(Member::new(
            zeroed.subject,
            zeroed.incarnation,
            State::Alive,
        ));
        let dump = StateDump {
            members,
            records: vec![Arc::new(zeroed.clone())],
            entries: Vec::new(),
        };
        let b = dump.encode();
        assert_eq!(
            b.len(),
            1 + 4 + 1 + zeroed.item_len() + 4 + 20 * member_len(&dump.members[0]) - 20 * 12
                + 10 * 12
        );
        let back = StateDump::decode(&b).unwrap();
        assert_eq!(back.records, dump.records);
        let key = |m: &Member<Identity>| (m.id().id, m.incarnation());
        let (mut want, mut got) = (dump.members.clone(), back.members.clone());
        want.sort_by_key(key);
        got.sort_by_key(key);
        assert_eq!(got, want);
        assert_eq!(back.encode(), b, "canonical");
        let mut long = b.clone();
        long.push(0);
        assert_eq!(StateDump::decode(&long), Err(DecodeError::Trailing(1)));
        // the record's alive member listed instead of implied: not canonical
        let mut listed = vec![VERSION];
        listed.extend_from_slice(&1u32.to_be_bytes());
        listed.push(RECORD_ONLY);
        listed.extend_from_slice(&Item::Node(Arc::new(zeroed.clone())).encode());
        listed.extend_from_slice(&1u32.to_be_bytes());
        put_member(
            &mut listed,
            &Member::new(zeroed.subject, zeroed.incarnation, State::Alive),
        );
        assert!(StateDump::decode(&listed).is_err());
        // and as a suspect it must be listed
        let n = listed.len();
        listed[n - 1] = 1;
        assert_eq!(StateDump::decode(&listed).unwrap().encode(), listed);
    }

    #[test]
    fn item_golden_bytes() {
        let subject = Identity::new(NodeId::from_index(1), "198.18.0.1:7946".parse().unwrap(), 2);
        let mut ident_bytes = b"0000000000000000000000001".to_vec();
        ident_bytes.extend_from_slice(&[4, 198, 18, 0, 1, 0x1f, 0x0a, 0, 0, 0, 2]);
        let rec = NodeRecord {
            subject,
            incarnation: 3,
            seq: 0x0102_0304_0506_0708,
            leaving: false,
            meta: Metadata {
                vtep: "198.18.0.1".parse().unwrap(),
                data_port: 4789,
                public_key: [0; 32],
                incarnation: [0xaa; 16],
                role: Role::Worker,
                version: "v1".into(),
            },
            sig: [0x77; 64],
        };
        let mut want = vec![1];
        want.extend_from_slice(&ident_bytes);
        want.extend_from_slice(&[0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 0]);
        want.extend_from_slice(&[4, 198, 18, 0, 1, 0x12, 0xb5]);
        want.extend_from_slice(&[0xaa; 16]);
        want.extend_from_slice(&[0, 2, b'v', b'1']);
        want.extend_from_slice(&[0x77; 64]);
        assert_eq!(Item::Node(Arc::new(rec.clone())).encode(), want);
        assert_eq!(want.len(), 1 + 36 + 2 + 8 + 1 + 7 + 16 + 4 + 64);
        // what the signature covers: domain, the record without its tag and signature, with
        // the x25519 key between the flags and the metadata
        let mut signed = b"shoal gossip node v1".to_vec();
        signed.extend_from_slice(&want[1..1 + 36 + 2 + 8 + 1]);
        signed.extend_from_slice(&[0x33; 32]);
        signed.extend_from_slice(&want[1 + 36 + 2 + 8 + 1..want.len() - 64]);
        assert_eq!(rec.signed_bytes(&[0x33; 32]), signed);

        let w = Item::Suspect {
            subject,
            incarnation: 9,
            from: NodeId::from_index(5),
            sig: [0x66; 64],
        };
        let mut want = vec![2];
        want.extend_from_slice(&ident_bytes);
        want.extend_from_slice(&[0, 9]);
        want.extend_from_slice(b"0000000000000000000000005");
        want.extend_from_slice(&[0x66; 64]);
        assert_eq!(w.encode(), want);
        let mut signed = b"shoal gossip suspect v1".to_vec();
        signed.extend_from_slice(&want[1..want.len() - 64]);
        assert_eq!(
            suspect_signed_bytes(&subject, 9, &NodeId::from_index(5)),
            signed
        );
    }

    #[test]
    fn huge_counts_do_not_allocate_or_panic() {
        let mut b = vec![VERSION];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            StateDump::decode(&b),
            Err(DecodeError::TooLong(_))
        ));
        let mut b = vec![VERSION];
        b.extend_from_slice(&50_000u32.to_be_bytes());
        assert_eq!(StateDump::decode(&b), Err(DecodeError::Truncated));
    }

    fn entry(
        keys: &crate::auth::NodeKeys,
        key: &[u8],
        version: u64,
        value: Option<&[u8]>,
    ) -> Entry {
        Entry::signed(
            NodeId::from_index(8),
            key.to_vec(),
            version,
            value.map(<[u8]>::to_vec),
            keys,
        )
        .unwrap()
    }

    #[test]
    fn entry_golden_bytes_and_signature() {
        let e = Entry {
            author: NodeId::from_index(1),
            key: b"ep".to_vec(),
            version: 0x0102_0304_0506_0708,
            value: Some(b"xyz".to_vec()),
            sig: [0x55; 64],
        };
        let mut want = vec![3];
        want.extend_from_slice(b"0000000000000000000000001");
        want.extend_from_slice(&[
            2, b'e', b'p', 1, 2, 3, 4, 5, 6, 7, 8, 1, 0, 3, b'x', b'y', b'z',
        ]);
        want.extend_from_slice(&[0x55; 64]);
        let item = Item::Entry(Arc::new(e.clone()));
        assert_eq!(item.encode(), want);
        assert_eq!(item.len(), want.len());
        assert_eq!(e.item_len(), want.len());
        // what the signature covers: the domain, then the entry without tag and signature
        let mut signed = b"shoal gossip entry v1".to_vec();
        signed.extend_from_slice(&want[1..want.len() - 64]);
        assert_eq!(e.signed_bytes(), signed);
        // a tombstone: flags 0, no length
        let t = Entry { value: None, ..e };
        let b = Item::Entry(Arc::new(t)).encode();
        assert_eq!(&b[1 + 25 + 3 + 8..1 + 25 + 3 + 8 + 1], &[0]);
        assert_eq!(b.len(), 1 + 25 + 3 + 8 + 1 + 64);
    }

    #[test]
    fn entry_signature_covers_every_field() {
        let keys = crate::auth::NodeKeys::from_secret([5; 32]);
        let other = crate::auth::NodeKeys::from_secret([6; 32]);
        let pk = keys.public().ed25519;
        let e = entry(&keys, b"ep/1", 7, Some(b"10.0.0.1"));
        assert!(e.verify(&pk, &keys));
        // signed by someone else, or verified under another key
        assert!(!e.verify(&other.public().ed25519, &keys));
        let forged = Entry::signed(e.author, e.key.clone(), 7, e.value.clone(), &other).unwrap();
        assert!(!forged.verify(&pk, &keys));
        // any field changed after signing
        let tampered = [
            Entry {
                author: NodeId::from_index(9),
                ..e.clone()
            },
            Entry {
                key: b"ep/2".to_vec(),
                ..e.clone()
            },
            Entry {
                version: 8,
                ..e.clone()
            },
            Entry {
                value: Some(b"10.0.0.2".to_vec()),
                ..e.clone()
            },
            Entry {
                value: None,
                ..e.clone()
            },
        ];
        for t in tampered {
            assert!(!t.verify(&pk, &keys), "{t:?}");
        }
        // and through the wire: a flipped value byte still decodes, and no longer verifies
        let mut b = Item::Entry(Arc::new(e)).encode();
        let at = b.len() - 64 - 1;
        b[at] ^= 1;
        let Ok(Item::Entry(back)) = Item::decode(&b) else {
            panic!("decodes")
        };
        assert!(!back.verify(&pk, &keys));
    }

    #[test]
    fn oversize_entries_are_refused_on_both_ends() {
        let keys = crate::auth::NodeKeys::from_secret([5; 32]);
        let a = NodeId::from_index(8);
        assert_eq!(
            Entry::signed(a, vec![0; MAX_ENTRY_KEY + 1], 1, None, &keys),
            Err(EntryError::KeyTooLong(MAX_ENTRY_KEY + 1))
        );
        assert_eq!(
            Entry::signed(a, vec![0; 4], 1, Some(vec![0; MAX_ENTRY_VALUE + 1]), &keys),
            Err(EntryError::ValueTooLong(MAX_ENTRY_VALUE + 1))
        );
        // the largest entry fits, and fits in a datagram beside an IPv6 header
        let big = entry(&keys, &[1; MAX_ENTRY_KEY], 1, Some(&[2; MAX_ENTRY_VALUE]));
        let b = Item::Entry(Arc::new(big)).encode();
        assert_eq!(b.len(), 1 + 25 + 1 + 64 + 8 + 1 + 2 + 512 + 64);
        assert!(Item::decode(&b).is_ok());
        let ipv6 = header_len(&Header {
            src: ident(1, true),
            src_incarnation: 0,
            dst: ident(2, true),
            message: Message::PingReq {
                target: ident(3, true),
                probe_number: 0,
            },
        });
        assert!(ipv6 + 2 + 2 + b.len() <= crate::membership::MAX_DATAGRAM - crate::seal::OVERHEAD);
        // a key length over the limit, as a sender would write it
        let mut long_key = vec![3];
        long_key.extend_from_slice(NodeId::from_index(8).as_bytes());
        long_key.push(MAX_ENTRY_KEY as u8 + 1);
        long_key.extend_from_slice(&[0; MAX_ENTRY_KEY + 1]);
        long_key.extend_from_slice(&[0; 8 + 1 + 64]);
        let err = Item::decode(&long_key).unwrap_err();
        assert_eq!(err, DecodeError::TooLong("entry key"));
        assert!(is_oversize_entry(&err));
        // a value length over the limit
        let mut long_value = vec![3];
        long_value.extend_from_slice(NodeId::from_index(8).as_bytes());
        long_value.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0x02, 0x01]);
        long_value.extend_from_slice(&[0; 513 + 64]);
        let err = Item::decode(&long_value).unwrap_err();
        assert_eq!(err, DecodeError::TooLong("entry value"));
        assert!(is_oversize_entry(&err));
        // unknown flags
        let mut b = Item::Entry(Arc::new(entry(&keys, b"k", 1, None))).encode();
        b[1 + 25 + 2 + 8] = 2;
        assert!(matches!(
            Item::decode(&b),
            Err(DecodeError::Tag {
                what: "entry flags",
                tag: 2
            })
        ));
    }

    #[test]
    fn states_with_entries_are_version_four_and_canonical() {
        let keys = crate::auth::NodeKeys::from_secret([5; 32]);
        let members = vec![Member::new(ident(3, false), 1, State::Suspect)];
        let v3 = StateDump {
            members: members.clone(),
            records: Vec::new(),
            entries: Vec::new(),
        };
        let b3 = v3.encode();
        assert_eq!(b3[0], VERSION);
        assert_eq!(StateDump::decode(&b3).unwrap(), v3);
        let (a, z) = (
            Arc::new(entry(&keys, b"a", 1, Some(b"x"))),
            Arc::new(entry(&keys, b"z", 2, None)),
        );
        // given out of order, encoded in (author, key) order
        let dump = StateDump {
            members,
            records: Vec::new(),
            entries: vec![Arc::clone(&z), Arc::clone(&a)],
        };
        let b = dump.encode();
        assert_eq!(b[0], STATE_VERSION_ENTRIES);
        assert_eq!(b.len(), b3.len() + dump.entries_len());
        assert_eq!(&b[1..b3.len()], &b3[1..], "the version-3 part unchanged");
        let back = StateDump::decode(&b).unwrap();
        assert_eq!(back.entries, vec![Arc::clone(&a), Arc::clone(&z)]);
        assert_eq!(back.encode(), b);
        for cut in 0..b.len() {
            assert!(StateDump::decode(&b[..cut]).is_err(), "prefix {cut}");
        }
        // version 4 with no entries is not canonical
        let mut empty = b3.clone();
        empty[0] = STATE_VERSION_ENTRIES;
        empty.extend_from_slice(&0u32.to_be_bytes());
        assert!(StateDump::decode(&empty).is_err());
        // nor is a repeated or out-of-order entry
        for pair in [[&a, &a], [&z, &a]] {
            let mut v = b3.clone();
            v[0] = STATE_VERSION_ENTRIES;
            v.extend_from_slice(&2u32.to_be_bytes());
            for e in pair {
                v.extend_from_slice(&Item::Entry(Arc::clone(e)).encode()[1..]);
            }
            assert!(StateDump::decode(&v).is_err());
        }
        // a version-3 state with entries bytes after it is trailing garbage
        let mut v = b3.clone();
        v.extend_from_slice(&b[b3.len()..]);
        assert!(matches!(
            StateDump::decode(&v),
            Err(DecodeError::Trailing(_))
        ));
        // an entry count no input could hold does not allocate
        let mut huge = b3;
        huge[0] = STATE_VERSION_ENTRIES;
        huge.extend_from_slice(&(MAX_DUMP_ENTRIES + 1).to_be_bytes());
        assert_eq!(
            StateDump::decode(&huge),
            Err(DecodeError::TooLong("push-pull entry count"))
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn arb_entry() -> impl Strategy<Value = Entry> {
            (
                any::<u128>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_ENTRY_KEY),
                any::<u64>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=MAX_ENTRY_VALUE)),
                proptest::array::uniform32(any::<u8>()),
            )
                .prop_map(|(author, key, version, value, half)| {
                    let mut sig = [0u8; 64];
                    sig[..32].copy_from_slice(&half);
                    sig[32..].copy_from_slice(&half);
                    Entry {
                        author: NodeId::from_index(author % 36u128.pow(24)),
                        key,
                        version,
                        value,
                        sig,
                    }
                })
        }

        proptest! {
            #[test]
            fn entry_items_round_trip(e in arb_entry()) {
                let item = Item::Entry(Arc::new(e));
                let b = item.encode();
                prop_assert_eq!(b.len(), item.len());
                prop_assert_eq!(Item::decode(&b), Ok(item));
                // every strict prefix and every extension is an error
                for cut in [0, 1, b.len() / 2, b.len() - 1] {
                    prop_assert!(Item::decode(&b[..cut]).is_err());
                }
                let mut long = b.clone();
                long.push(0);
                prop_assert_eq!(Item::decode(&long), Err(DecodeError::Trailing(1)));
            }

            #[test]
            fn states_with_entries_round_trip(entries in proptest::collection::vec(arb_entry(), 0..20)) {
                // one per (author, key)
                let mut seen = std::collections::HashSet::new();
                let entries: Vec<Arc<Entry>> = entries
                    .into_iter()
                    .filter(|e| seen.insert((e.author, e.key.clone())))
                    .map(Arc::new)
                    .collect();
                let dump = StateDump { members: Vec::new(), records: Vec::new(), entries };
                let b = dump.encode();
                let back = StateDump::decode(&b).unwrap();
                let mut want = dump.entries.clone();
                want.sort_by(|a, b| (a.author, &a.key).cmp(&(b.author, &b.key)));
                prop_assert_eq!(&back.entries, &want);
                prop_assert_eq!(back.encode(), b);
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_decoded_items_encode_back(b in proptest::collection::vec(any::<u8>(), 0..700)) {
                if let Ok(item) = Item::decode(&b) {
                    prop_assert_eq!(item.encode(), b.clone());
                }
                let mut with_tag = vec![3];
                with_tag.extend_from_slice(&b);
                if let Ok(item) = Item::decode(&with_tag) {
                    prop_assert_eq!(item.encode(), with_tag);
                }
            }
        }
    }

    #[test]
    fn version_string_is_bounded() {
        let mut m = meta();
        m.version = "x".repeat(40);
        assert!(m.validate().is_err());
        let keys = crate::auth::NodeKeys::from_secret([5; 32]);
        let mut b = Item::Node(Arc::new(record(&keys))).encode();
        // claim a 200-byte version
        let len_at = b.len() - 64 - 1 - "0.1.0".len();
        assert_eq!(b[len_at], 5);
        b[len_at] = 200;
        assert!(Item::decode(&b).is_err());
    }
}
