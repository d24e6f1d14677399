//! The sans-IO data-plane engine: frames in from the network device, datagrams out to the
//! underlay, and back.
//!
//! No clock, no sockets, no threads: the caller passes `now`, the frame or datagram, and a
//! [`Transmits`] queue, and gets back what to send or the frame to deliver. Call order, for a
//! driver:
//!
//! 1. Configure: [`Engine::add_network`], [`Engine::add_epoch`], [`Engine::set_peer`], and the
//!    forwarding tables through [`Engine::fdb_mut`].
//! 2. For each frame read from the device: [`Engine::handle_frame`], then send every datagram in
//!    the [`Transmits`] queue and [`Transmits::clear`] it.
//! 3. For each datagram read from the underlay: [`Engine::handle_datagram`]; on `Ok`, write
//!    [`Opened::frame`] to the device; on `Err`, the drop has already been counted.
//!
//! Only [`Opened`] values reach the device, and on an encrypted network only a session's open
//! can make one (it needs a [`Verified`] proof).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::buffer::{Packet, Transmits, HEADROOM, TAILROOM};
use crate::crypto::{
    self, EpochKey, KeyError, Keyring, KeyringError, Local, OpenError, PeerKey, SealError, Session,
    SessionState, Shared, Verified,
};
use crate::fdb::{Fdb, LearnError};
use crate::replay::ReplayError;
use crate::wire::{self, envelope, header, Envelope, Header, Mac, Vni, ETHERNET_HEADER_LEN};

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $name:ident => $label:literal,)*) => {
        /// Why the engine dropped a frame or a datagram. Every drop is counted.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[doc = $doc])* $name,)*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];

            /// A short snake_case name, for counters and logs.
            pub const fn label(self) -> &'static str {
                match self {
                    $(DropReason::$name => $label,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// Shorter than its headers, or an inner frame shorter than an Ethernet header.
    TooShort => "too_short",
    /// The VXLAN header is malformed (the I flag is clear).
    BadHeader => "bad_header",
    /// A sealed envelope of a version this build does not speak.
    UnknownVersion => "unknown_version",
    /// No network with this VNI here.
    UnknownVni => "unknown_vni",
    /// The sender's address is not a known peer or VTEP.
    UnknownPeer => "unknown_peer",
    /// A plain VXLAN datagram on an encrypted network.
    PlaintextOnEncrypted => "plaintext_on_encrypted",
    /// A sealed datagram on a plain network.
    SealedOnPlain => "sealed_on_plain",
    /// Sealed under a key epoch this node does not hold.
    UnknownEpoch => "unknown_epoch",
    /// Sealed by an incarnation of the peer other than the one the control plane announced.
    WrongIncarnation => "wrong_incarnation",
    /// A counter seen before, or older than the replay window.
    Replay => "replay",
    /// The tag did not verify.
    Authentication => "authentication",
    /// The inner source MAC belongs to another VTEP (assigned to it, or learned from it and
    /// still in use), or is a group address.
    SpoofedSource => "spoofed_source",
    /// The inner source MAC is new, and the sending VTEP has learned as many MACs on this
    /// network as it may ([`crate::fdb::MAX_LEARNED_PER_VTEP`]).
    LearnLimit => "learn_limit",
    /// No session to seal with: the peer has no key, or none for the sending epoch.
    NoSession => "no_session",
    /// The sending session ran out of counters (rotate the key epoch).
    CounterExhausted => "counter_exhausted",
    /// Unknown unicast or broadcast with an empty flood list.
    NoDestination => "no_destination",
    /// The frame does not fit the buffers.
    Oversize => "oversize",
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = Self::ALL.len();
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.label())
    }
}

/// A counter per [`DropReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::COUNT]);

impl DropCounts {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &DropCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }

    /// The count for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Each reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.get(r)))
    }

    pub(crate) fn bump(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }
}

/// Traffic counters, for the engine as a whole or for one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Frame bytes sent (before encapsulation).
    pub tx_bytes: u64,
    /// Frames delivered.
    pub rx_packets: u64,
    /// Frame bytes delivered.
    pub rx_bytes: u64,
    /// Drops by reason.
    pub drops: DropCounts,
}

impl Counters {
    /// Adds `other`'s counts to these (to merge the two directions' engines, for example).
    pub fn add(&mut self, other: &Counters) {
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.drops.add(&other.drops);
    }
}

/// A peer: another node, or an external VTEP on plain networks.
#[derive(Debug)]
pub struct Peer {
    vtep: SocketAddr,
    key: Option<PeerKey>,
    /// The X25519 secret shared with `key.public`, kept so a restart of the peer (same key,
    /// new incarnation) costs no new X25519.
    shared: Option<Shared>,
    sessions: [Option<Session>; 2],
    counters: Counters,
    last_rx: Option<Instant>,
    last_rx_epoch: Option<u32>,
}

impl Peer {
    /// Underlay address and data-path port.
    pub fn vtep(&self) -> SocketAddr {
        self.vtep
    }

    /// The peer's key, if it is a shoal node (external VTEPs have none).
    pub fn key(&self) -> Option<&PeerKey> {
        self.key.as_ref()
    }

    /// The epochs this node holds sessions with the peer under.
    pub fn epochs(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions.iter().flatten().map(Session::epoch)
    }

    /// Traffic with this peer.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// When the last frame from this peer was delivered.
    pub fn last_rx(&self) -> Option<Instant> {
        self.last_rx
    }

    /// The key epoch of the last sealed datagram opened from this peer.
    pub fn last_rx_epoch(&self) -> Option<u32> {
        self.last_rx_epoch
    }

    fn session_mut(&mut self, epoch: u32) -> Option<&mut Session> {
        self.sessions
            .iter_mut()
            .flatten()
            .find(|s| s.epoch() == epoch)
    }
}

/// One overlay network.
#[derive(Debug, Default)]
pub struct Network {
    encrypted: bool,
    fdb: Fdb,
}

impl Network {
    /// Whether traffic is sealed.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// The forwarding table.
    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }
}

/// How a delivered frame was vouched for.
#[derive(Debug)]
pub enum Provenance {
    /// Opened by the session with the sending peer under this key epoch.
    Sealed {
        /// The key epoch.
        epoch: u32,
        /// The proof that the session authenticated it.
        proof: Verified,
    },
    /// Received on a plain network from a known VTEP (RFC 7348: no authentication).
    Plain,
}

/// A frame the engine accepted for delivery to the network device.
#[derive(Debug)]
pub struct Opened<'a> {
    vni: Vni,
    vtep: IpAddr,
    frame: &'a [u8],
    provenance: Provenance,
}

impl<'a> Opened<'a> {
    /// The Ethernet frame.
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// The network it arrived on.
    pub fn vni(&self) -> Vni {
        self.vni
    }

    /// The peer that sent it.
    pub fn vtep(&self) -> IpAddr {
        self.vtep
    }

    /// How it was vouched for.
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }
}

/// Why a configuration change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The network exists already.
    #[error("network with VNI {0} exists already")]
    NetworkExists(Vni),
    /// No such network.
    #[error("no network with VNI {0}")]
    UnknownNetwork(Vni),
    /// A key epoch change the keyring refuses.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// A peer key that cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Retired sessions kept per peer node ID (each key epoch counts apart): the newest ones.
pub const RETIRED_PER_NODE: usize = 8;
/// Retired sessions kept in all.
pub const RETIRED_MAX: usize = 4096;

/// Counters and windows of sessions whose keys were dropped (peer removed, or re-keyed by a new
/// incarnation), so that the same keys never start over from counter zero; forgotten when their
/// epoch is retired. Bounded: at most [`RETIRED_PER_NODE`] per peer node ID and [`RETIRED_MAX`]
/// in all, the oldest going first.
///
/// Forgetting one is safe. Its keys come back only if that peer announces the very same
/// 128-bit random incarnation again, which only the peer itself can do (its announcements are
/// signed and ordered): the pair key it would repeat nonces under is one that peer holds
/// already, so it learns nothing it could not decrypt, and can forge nothing it could not seal.
#[derive(Debug, Default)]
struct Retired {
    entries: HashMap<(PeerKey, u32), (u64, SessionState)>,
    seq: u64,
}

impl Retired {
    fn take(&mut self, key: &PeerKey, epoch: u32) -> Option<SessionState> {
        self.entries.remove(&(*key, epoch)).map(|(_, s)| s)
    }

    fn put(&mut self, key: PeerKey, epoch: u32, state: SessionState) {
        self.seq += 1;
        self.entries.insert((key, epoch), (self.seq, state));
        let same_node = |k: &(PeerKey, u32)| k.0.node_id == key.node_id;
        if self.entries.keys().filter(|k| same_node(k)).count() > RETIRED_PER_NODE {
            self.evict_oldest(same_node);
        }
        if self.entries.len() > RETIRED_MAX {
            self.evict_oldest(|_| true);
        }
    }

    fn evict_oldest(&mut self, among: impl Fn(&(PeerKey, u32)) -> bool) {
        let oldest = self
            .entries
            .iter()
            .filter(|(k, _)| among(k))
            .min_by_key(|(_, (seq, _))| *seq)
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.entries.remove(&k);
        }
    }

    fn retire_epoch(&mut self, id: u32) {
        self.entries.retain(|(_, epoch), _| *epoch != id);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The data-plane engine of one node.
#[derive(Debug)]
pub struct Engine {
    local: Local,
    keyring: Keyring,
    networks: HashMap<Vni, Network>,
    peers: HashMap<IpAddr, Peer>,
    retired: Retired,
    counters: Counters,
}

impl Engine {
    /// An engine for `local`: this node's key pair, node ID and incarnation (drawn by the agent
    /// at every start of the data path, see [`crate::crypto`]).
    pub fn new(local: Local) -> Self {
        Engine {
            local,
            keyring: Keyring::new(),
            networks: HashMap::new(),
            peers: HashMap::new(),
            retired: Retired::default(),
            counters: Counters::default(),
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.local.side().public
    }

    /// This node's incarnation tag (what its envelopes carry).
    pub fn incarnation(&self) -> u32 {
        self.local.side().incarnation.tag()
    }

    /// This node as its peers see it: public key, node ID, incarnation.
    pub fn local(&self) -> &PeerKey {
        self.local.side()
    }

    /// Sessions kept without keys (see [`RETIRED_PER_NODE`]).
    pub fn retired_sessions(&self) -> usize {
        self.retired.len()
    }

    /// Engine-wide counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The key epochs.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Adds a network.
    pub fn add_network(&mut self, vni: Vni, encrypted: bool) -> Result<(), ConfigError> {
        if self.networks.contains_key(&vni) {
            return Err(ConfigError::NetworkExists(vni));
        }
        self.networks.insert(
            vni,
            Network {
                encrypted,
                fdb: Fdb::new(),
            },
        );
        Ok(())
    }

    /// Removes a network and its forwarding table.
    pub fn remove_network(&mut self, vni: Vni) -> Result<(), ConfigError> {
        self.networks
            .remove(&vni)
            .map(drop)
            .ok_or(ConfigError::UnknownNetwork(vni))
    }

    /// A network.
    pub fn network(&self, vni: Vni) -> Option<&Network> {
        self.networks.get(&vni)
    }

    /// A network's forwarding table, to change.
    pub fn fdb_mut(&mut self, vni: Vni) -> Result<&mut Fdb, ConfigError> {
        self.networks
            .get_mut(&vni)
            .map(|n| &mut n.fdb)
            .ok_or(ConfigError::UnknownNetwork(vni))
    }

    /// The peers.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// The peer at `vtep`.
    pub fn peer(&self, vtep: IpAddr) -> Option<&Peer> {
        self.peers.get(&vtep)
    }

    fn make_session(&mut self, shared: &Shared, key: &PeerKey, epoch: &EpochKey) -> Session {
        let keys = crypto::derive_shared(shared, self.local.side(), key, epoch);
        let state = self.retired.take(key, epoch.id()).unwrap_or_default();
        Session::resume(epoch.id(), self.incarnation(), &keys, state)
    }

    fn retire_sessions(&mut self, key: Option<PeerKey>, sessions: &mut [Option<Session>; 2]) {
        for s in sessions.iter_mut() {
            if let (Some(key), Some(session)) = (key, s.take()) {
                self.retired.put(key, session.epoch(), session.state());
            }
        }
    }

    /// Adds or updates the peer at `vtep`: a shoal node with its key, or an external VTEP
    /// (`key` = `None`, plain networks only). A changed key or incarnation replaces the
    /// sessions; an unchanged one keeps them.
    pub fn set_peer(&mut self, vtep: SocketAddr, key: Option<PeerKey>) -> Result<(), ConfigError> {
        let ip = vtep.ip();
        let unchanged = self.peers.get(&ip).is_some_and(|p| p.key == key);
        if unchanged {
            if let Some(p) = self.peers.get_mut(&ip) {
                p.vtep = vtep;
            }
            return Ok(());
        }
        let mut sessions: [Option<Session>; 2] = [None, None];
        let mut shared = None;
        if let Some(k) = &key {
            // The same public key as before (a restart of the peer): no new X25519.
            let cached = self
                .peers
                .get(&ip)
                .filter(|p| p.key.is_some_and(|old| old.public == k.public))
                .and_then(|p| p.shared.clone());
            let secret = match cached {
                Some(s) => s,
                None => crypto::shared(self.local.key(), &k.public)?,
            };
            let epochs: Vec<EpochKey> = self.keyring.epochs().cloned().collect();
            for (slot, epoch) in sessions.iter_mut().zip(&epochs) {
                *slot = Some(self.make_session(&secret, k, epoch));
            }
            shared = Some(secret);
        }
        let old = self.peers.insert(
            ip,
            Peer {
                vtep,
                key,
                shared,
                sessions,
                counters: Counters::default(),
                last_rx: None,
                last_rx_epoch: None,
            },
        );
        if let Some(mut old) = old {
            self.retire_sessions(old.key, &mut old.sessions);
            if let Some(p) = self.peers.get_mut(&ip) {
                p.counters = old.counters;
                p.last_rx = old.last_rx;
                p.last_rx_epoch = old.last_rx_epoch;
            }
        }
        Ok(())
    }

    /// Removes the peer at `vtep` (revocation): its sessions' keys are dropped at once, and
    /// its forwarding entries and flood-list places on every network go with it. Returns
    /// whether there was such a peer.
    pub fn remove_peer(&mut self, vtep: IpAddr) -> bool {
        let Some(mut peer) = self.peers.remove(&vtep) else {
            return false;
        };
        self.retire_sessions(peer.key, &mut peer.sessions);
        for n in self.networks.values_mut() {
            n.fdb.purge_vtep(&vtep);
        }
        true
    }

    /// Adds a live key epoch and derives every peer's session under it. The first epoch
    /// becomes the sending one.
    pub fn add_epoch(&mut self, epoch: EpochKey) -> Result<(), ConfigError> {
        let mut fresh = Vec::with_capacity(self.peers.len());
        let keyed: Vec<(IpAddr, PeerKey, Shared)> = self
            .peers
            .iter()
            .filter_map(|(ip, p)| Some((*ip, p.key?, p.shared.clone()?)))
            .collect();
        if self.keyring.get(epoch.id()).is_some() {
            return Err(KeyringError::Duplicate(epoch.id()).into());
        }
        if self.keyring.epochs().count() == 2 {
            return Err(KeyringError::Full(epoch.id()).into());
        }
        for (ip, key, shared) in keyed {
            fresh.push((ip, self.make_session(&shared, &key, &epoch)));
        }
        self.keyring.add(epoch)?;
        for (ip, session) in fresh {
            if let Some(slot) = self
                .peers
                .get_mut(&ip)
                .and_then(|p| p.sessions.iter_mut().find(|s| s.is_none()))
            {
                *slot = Some(session);
            }
        }
        Ok(())
    }

    /// Designates a live epoch for sending.
    pub fn set_send_epoch(&mut self, id: u32) -> Result<(), ConfigError> {
        Ok(self.keyring.set_send(id)?)
    }

    /// Retires a live epoch that is not the sending one: every session under it is dropped.
    pub fn retire_epoch(&mut self, id: u32) -> Result<(), ConfigError> {
        self.keyring.retire(id)?;
        for p in self.peers.values_mut() {
            for s in p.sessions.iter_mut() {
                if s.as_ref().is_some_and(|s| s.epoch() == id) {
                    *s = None;
                }
            }
        }
        self.retired.retire_epoch(id);
        Ok(())
    }

    fn count_drop(&mut self, peer: Option<IpAddr>, reason: DropReason) -> DropReason {
        self.counters.drops.bump(reason);
        if let Some(p) = peer.and_then(|ip| self.peers.get_mut(&ip)) {
            p.counters.drops.bump(reason);
        }
        reason
    }

    /// Handles a frame from the network device on network `vni`: queues one datagram per
    /// destination in `out` (the FDB's VTEP for a known unicast MAC; every VTEP of the flood
    /// list for broadcast, multicast and unknown unicast) and returns how many. The frame is
    /// sealed where it lies in `pkt` for unicast (`pkt` gets a spare buffer back in exchange);
    /// flooding copies it once per destination.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        vni: Vni,
        pkt: &mut Packet,
        out: &mut Transmits,
    ) -> Result<usize, DropReason> {
        let _ = now;
        let len = pkt.len();
        let Some(dst) = Mac::dst_of(pkt.data()).filter(|_| len >= ETHERNET_HEADER_LEN) else {
            return Err(self.count_drop(None, DropReason::TooShort));
        };
        let Some(network) = self.networks.get(&vni) else {
            return Err(self.count_drop(None, DropReason::UnknownVni));
        };
        let encrypted = network.encrypted;
        let send_epoch = self.keyring.send_epoch();
        let unicast = if dst.is_multicast() {
            None
        } else {
            network.fdb.lookup(&dst).map(|e| e.vtep)
        };

        if let Some(vtep) = unicast {
            return self.unicast(vni, encrypted, vtep, pkt, out);
        }

        let flood = network.fdb.flood();
        if flood.is_empty() {
            return Err(self.count_drop(None, DropReason::NoDestination));
        }
        let mut sent = 0;
        for &vtep in flood {
            let mut copy = out.take_spare();
            let result = if !copy.set_frame(pkt.data()) {
                Err(DropReason::Oversize)
            } else {
                match self.peers.get_mut(&vtep) {
                    None => Err(DropReason::UnknownPeer),
                    Some(peer) => encap(peer, vni, encrypted, send_epoch, &mut copy),
                }
            };
            match result {
                Ok(dst) => {
                    out.push(dst, copy);
                    sent += 1;
                }
                Err(reason) => {
                    out.recycle(copy);
                    self.counters.drops.bump(reason);
                    if let Some(p) = self.peers.get_mut(&vtep) {
                        p.counters.drops.bump(reason);
                    }
                }
            }
        }
        self.counters.tx_packets += sent as u64;
        self.counters.tx_bytes += (sent * len) as u64;
        Ok(sent)
    }

    /// Handles a frame for one given peer on network `vni`, whatever its destination MAC: the
    /// routing mesh sends a flow's frames to the node it came in through (see
    /// `docs/services.md`). Sealed in place, as [`Engine::handle_frame`] does for unicast.
    pub fn handle_frame_to(
        &mut self,
        now: Instant,
        vni: Vni,
        vtep: IpAddr,
        pkt: &mut Packet,
        out: &mut Transmits,
    ) -> Result<usize, DropReason> {
        let _ = now;
        if pkt.len() < ETHERNET_HEADER_LEN {
            return Err(self.count_drop(None, DropReason::TooShort));
        }
        let Some(network) = self.networks.get(&vni) else {
            return Err(self.count_drop(None, DropReason::UnknownVni));
        };
        let encrypted = network.encrypted;
        self.unicast(vni, encrypted, vtep, pkt, out)
    }

    /// Seals the frame in `pkt` for `vtep` and queues it: one datagram, or the counted reason.
    fn unicast(
        &mut self,
        vni: Vni,
        encrypted: bool,
        vtep: IpAddr,
        pkt: &mut Packet,
        out: &mut Transmits,
    ) -> Result<usize, DropReason> {
        let len = pkt.len();
        let send_epoch = self.keyring.send_epoch();
        let result = match self.peers.get_mut(&vtep) {
            None => Err(DropReason::UnknownPeer),
            Some(peer) => encap(peer, vni, encrypted, send_epoch, pkt).map(|dst| {
                let mut sealed = out.take_spare();
                core::mem::swap(pkt, &mut sealed);
                out.push(dst, sealed);
            }),
        };
        match result {
            Ok(()) => {
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64;
                Ok(1)
            }
            Err(reason) => Err(self.count_drop(Some(vtep), reason)),
        }
    }

    /// Handles a datagram from the underlay, sent from `src`. On success the frame (decrypted
    /// in place in `pkt`) is ready for the network device; otherwise the reason is counted and
    /// returned, and nothing of the datagram is delivered.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        pkt: &'a mut Packet,
    ) -> Result<Opened<'a>, DropReason> {
        self.handle_datagram_slice(now, src, pkt.data_mut())
    }

    /// [`Engine::handle_datagram`] for a datagram in any buffer (one segment of a
    /// GRO-coalesced receive, for example), opened in place.
    pub fn handle_datagram_slice<'a>(
        &mut self,
        now: Instant,
        src: SocketAddr,
        data: &'a mut [u8],
    ) -> Result<Opened<'a>, DropReason> {
        let ip = src.ip();
        let (vni, from, to, provenance) = match self.open(now, ip, data) {
            Ok(v) => v,
            Err((peer_known, reason)) => {
                return Err(self.count_drop(peer_known.then_some(ip), reason))
            }
        };
        let len = (to - from) as u64;
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += len;
        if let Some(p) = self.peers.get_mut(&ip) {
            p.counters.rx_packets += 1;
            p.counters.rx_bytes += len;
            p.last_rx = Some(now);
            if let Provenance::Sealed { epoch, .. } = &provenance {
                p.last_rx_epoch = Some(*epoch);
            }
        }
        let data: &'a [u8] = data;
        Ok(Opened {
            vni,
            vtep: ip,
            frame: &data[from..to],
            provenance,
        })
    }

    /// Checks and opens a datagram in place, and binds the frame's source MAC to the peer
    /// (see [`crate::fdb`]). Returns the VNI, the frame's range and its provenance, or whether
    /// the peer is known and the reason to drop.
    fn open(
        &mut self,
        now: Instant,
        ip: IpAddr,
        data: &mut [u8],
    ) -> Result<(Vni, usize, usize, Provenance), (bool, DropReason)> {
        let hdr = Header::new_checked(&data[..]).map_err(|e| (false, wire_drop(e)))?;
        let (vni, sealed) = (hdr.vni(), hdr.is_sealed());
        let network = self
            .networks
            .get_mut(&vni)
            .ok_or((false, DropReason::UnknownVni))?;
        let peer = self
            .peers
            .get_mut(&ip)
            .ok_or((false, DropReason::UnknownPeer))?;
        let fail = |reason| (true, reason);
        let (from, to, provenance) = match (sealed, network.encrypted) {
            (false, true) => return Err(fail(DropReason::PlaintextOnEncrypted)),
            (true, false) => return Err(fail(DropReason::SealedOnPlain)),
            (false, false) => (header::HEADER_LEN, data.len(), Provenance::Plain),
            (true, true) => {
                let mut env = Envelope::new_checked(&mut *data).map_err(|e| fail(wire_drop(e)))?;
                let key = peer.key.ok_or(fail(DropReason::NoSession))?;
                if env.incarnation() != key.incarnation.tag() {
                    return Err(fail(DropReason::WrongIncarnation));
                }
                let epoch = env.epoch();
                let session = peer
                    .session_mut(epoch)
                    .ok_or(fail(DropReason::UnknownEpoch))?;
                let proof = session.open(&mut env).map_err(|e| {
                    fail(match e {
                        OpenError::Replay(ReplayError::Duplicate | ReplayError::TooOld) => {
                            DropReason::Replay
                        }
                        OpenError::Authentication => DropReason::Authentication,
                    })
                })?;
                (
                    envelope::HEADER_LEN,
                    data.len() - envelope::TAG_LEN,
                    Provenance::Sealed { epoch, proof },
                )
            }
        };
        let frame = &data[from..to];
        if frame.len() < ETHERNET_HEADER_LEN {
            return Err(fail(DropReason::TooShort));
        }
        let src_mac = Mac::src_of(frame).ok_or(fail(DropReason::TooShort))?;
        if src_mac.is_multicast() {
            return Err(fail(DropReason::SpoofedSource));
        }
        // Only now, with the frame authenticated (or, plain, from a known VTEP): a MAC of
        // another peer is refused, a new one is bound to this peer.
        network.fdb.learn(src_mac, ip, now).map_err(|e| match e {
            LearnError::Taken(_) => fail(DropReason::SpoofedSource),
            LearnError::Full => fail(DropReason::LearnLimit),
        })?;
        Ok((vni, from, to, provenance))
    }
}

fn wire_drop(e: wire::Error) -> DropReason {
    match e {
        wire::Error::Truncated => DropReason::TooShort,
        wire::Error::NoVni | wire::Error::NotSealed | wire::Error::VniOutOfRange(_) => {
            DropReason::BadHeader
        }
        wire::Error::UnknownVersion(_) => DropReason::UnknownVersion,
    }
}

/// Encapsulates (and on encrypted networks seals) the frame in `pkt` for `peer`, in place.
/// Returns the underlay destination.
fn encap(
    peer: &mut Peer,
    vni: Vni,
    encrypted: bool,
    send_epoch: Option<u32>,
    pkt: &mut Packet,
) -> Result<SocketAddr, DropReason> {
    let frame_len = pkt.len() as u64;
    if encrypted {
        let session = send_epoch
            .and_then(|e| peer.session_mut(e))
            .ok_or(DropReason::NoSession)?;
        let datagram = pkt.grow(HEADROOM, TAILROOM).ok_or(DropReason::Oversize)?;
        session.seal(vni, datagram).map_err(|e| match e {
            SealError::CounterExhausted => DropReason::CounterExhausted,
            SealError::BufferTooSmall => DropReason::Oversize,
        })?;
    } else {
        let datagram = pkt
            .grow(header::HEADER_LEN, 0)
            .ok_or(DropReason::Oversize)?;
        header::Repr { vni, sealed: false }.emit(&mut Header::new_unchecked(datagram));
    }
    peer.counters.tx_packets += 1;
    peer.counters.tx_bytes += frame_len;
    Ok(peer.vtep)
}
