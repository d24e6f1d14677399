//! [`Membership`]: the sans-IO gossip core. It owns a `foca::Foca` and adds what foca leaves
//! out: the sealed envelope, admission, node metadata, push-pull state sync, Lifeguard-style
//! local health and dynamic suspicion.
//!
//! Call order (as quinn-proto's `Connection`):
//!
//! 1. feed input: [`Membership::handle_datagram`] for every UDP datagram,
//!    [`Membership::handle_pushpull`] for every push-pull frame,
//!    [`Membership::handle_timeout`] when [`Membership::poll_timeout`]'s deadline has passed,
//!    and API calls (`join`, `leave`, `update_metadata`, `set_admission`, `set_keys`);
//! 2. drain output: [`Membership::poll_transmit`] (datagrams to send),
//!    [`Membership::poll_pushpull`] (peers to sync with over TCP), [`Membership::poll_event`].
//!
//! Nothing here reads the clock or touches a socket: time comes in as `now`, randomness as
//! a seed.
//!
//! ## Local health (Lifeguard, Dadgar et al. 2018)
//!
//! A health score `h` in `0..=max_health` rises when this node's own probe fails, when it
//! must refute a suspicion about itself, and when its timers fire late (the node was stalled:
//! a direct sign that it, not its peers, is slow); it falls by one with each probe that
//! succeeds. With `h > 0` the probe period, the probe round-trip wait and the suspicion
//! timeout are all multiplied by `1 + h`, and a suspicion timer that fires late is re-armed
//! once for a probe period, so the input queued during a stall (refutations, acks) is read
//! before a healthy member is declared down.
//!
//! ## Buddy system (Lifeguard)
//!
//! A probe to a member we hold as suspect carries that suspicion, so the member learns of it
//! from the probe itself and refutes, even if it missed the rumour.
//!
//! ## Dynamic suspicion
//!
//! A member that fails our probe is suspected; we broadcast an [`Item::Suspect`] naming us
//! as an independent witness. The suspicion timeout starts at `suspicion_max` and shrinks
//! towards `suspicion_min` as `k` other members independently confirm it:
//! `max(min, max - (max - min) * ln(c + 1) / ln(k + 1))`. A crashed node is confirmed by
//! every prober and goes down fast; a healthy node suspected through a lost packet gets the
//! long timeout and time to refute.
//!
//! ## Flap damping
//!
//! For a while after a member was seen down ([`Config::flap_damping`]), a suspicion of it
//! waits the whole `suspicion_max`, without quorum or witnesses, and each such suspicion
//! heard from another member starts that while again. A host that stalls for a few seconds
//! now and then is declared down at its first stall and rejoins; its later stalls are
//! suspicions it refutes, not down-and-rejoin cycles. A member never seen down keeps the fast path, so crash
//! detection is unchanged. Many members down at once (a partition and its heal) switch it
//! off: there the fast path is what reconnects the two sides.
//!
//! ## Authentication (who speaks for whom)
//!
//! Every datagram and stream frame is sealed per pair of nodes ([`crate::seal`]): one that
//! opens names its sender, and the foca header inside must name the same node (else
//! `dropped_spoofed`). What speaks for a node is signed by it (Ed25519, keys from the
//! [`Admission`] directory): its [`NodeRecord`] (identity, incarnation, metadata, leaving)
//! and its suspicion witnesses. foca's own member records carry no author, so before foca
//! sees a relayed record about member X it is checked against what X itself stated (the
//! highest (identity, incarnation) of X's signed records and of X's own datagram headers):
//! - `Alive(X, i)` and `Suspect(X, i)` pass only if X stated that identity and an
//!   incarnation of at least `i` (a member cannot invent an incarnation or a bump);
//! - `Down(X, i)` from anyone but X becomes `Suspect(X, i)` (then the rule above): each node
//!   declares X down itself, by a quorum of signed witnesses, by its own timer for every
//!   suspicion it hears (`suspicion_max`, then a check of X: four announces, silence
//!   declares), or at once by such a check when someone declared X down and it suspects X
//!   too; a node that leaves says so in its signed record;
//! - records about ourselves: a suspicion we really had is refuted (foca), a `Down` is
//!   treated as a suspicion, one about another identity of our node is dropped; a member's
//!   direct "you are down" (TurnUndead) makes us refute, at most once per [`RENEW_HOLD`],
//!   never renew our identity;
//! - when a signed record raises what X stated above what foca holds, we apply it to foca
//!   ourselves, so a refutation lands even where its relayed foca record was dropped; a
//!   record refuting the incarnation X was declared down at takes X back up (foca keeps a
//!   down identity down: the core removes and adds it again).
//!
//! Signed records and witnesses are spread by the core itself (its record queue), ahead of
//! foca's updates. Numbers a sender advances are bounded: an envelope epoch (the sender's
//! start, wall-clock milliseconds) more than [`MAX_EPOCH_AHEAD`] ahead of our wall clock is
//! refused; record sequence numbers, bumps and incarnations rise only under their author's
//! signature.
//!
//! ## Entries (application tables)
//!
//! Each node also holds a small table of its own, [`Membership::set_entry`]: opaque keys
//! (at most [`MAX_ENTRY_KEY`](codec::MAX_ENTRY_KEY) bytes) mapping to opaque values (at most
//! [`MAX_ENTRY_VALUE`](codec::MAX_ENTRY_VALUE) bytes; `None` deletes, as a tombstone) at a
//! version the node chooses. Each entry is signed by its author ([`Entry`]) and believed
//! only under the author's directory key: a member can relay another's entries, never
//! forge or alter them. For one (author, key) the higher version wins; an equal or lower
//! one is stale. An entry travels as one item of its own, in the core's queue after
//! records and witnesses, `max_transmissions + num_indirect_probes` times per node; and at
//! once: a new entry, ours or one first heard in a datagram, makes the core gossip to
//! `num_indirect_probes` members [`EAGER_ROUNDS`] times, [`EAGER_SPACING`] apart, so it
//! crosses the cluster in a few network round trips rather than in gossip periods. Push-pull states carry every entry held, tombstones
//! included, so a node that missed broadcasts converges; the entries a state brings that
//! are new to us (at most [`MAX_STATE_RELAY`], none from our first state: a join) are spread
//! on, since a node that missed a change is seldom the only one (a healed split).
//!
//! Lifetimes: an author's entries are dropped (reported as removals) when it left or was
//! removed from the directory, and once it has been down for
//! [`Config::entries_down_grace`]; until it is back up, its entries are refused, but parked
//! for a while, for those that arrive just before the record that takes it back up.
//! A node sends its own entries again when its identity changes or a member tells it that
//! it was declared down (at most once per [`RESEND_HOLD`]). Tombstones are forgotten after
//! [`Config::tombstone_ttl`]; our own live entries never age. [`Event::Entry`] reports every
//! change of what is held, our own calls included.
//!
//! [`Config::plain_swim`] turns all of the above off (`local_health`, `dynamic_suspicion`,
//! `buddy_system`, `confirm_probes`, `flap_damping`): the plain SWIM baseline the
//! simulation compares with (its relayed suspicions wait `suspicion_max` and are declared
//! without a check).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use foca::{
    BroadcastHandler, Foca, Header, Invalidates, Member, Message, OwnedNotification, Runtime,
    State, Timer,
};
use rand_0_10::rngs::SmallRng;
use rand_0_10::{RngExt, SeedableRng};

pub use crate::auth::Admission;
use crate::auth::Crypto;
use crate::codec::{
    self, seq_after, suspect_signed_bytes, Codec, DecodeError, Entry, EntryError, Item, NodeRecord,
    Reader, StateDump,
};
use crate::entries::{Refused, Table};
use crate::identity::{Identity, Metadata, MetadataError, NodeId};
use crate::peers::Peers;
use crate::relay::RecordQueue;
use crate::seal::{
    Keyring, Kind, OpenError, Opened, ReplayError, ReplayWindow, SealError, Sealer, Sequence,
    OVERHEAD,
};

/// Independent witnesses (the first suspecter plus confirmation probes) after which any
/// member may declare a suspect down, once `suspicion_min` has passed since it heard of it.
const QUORUM: usize = 3;

/// Most confirmation checks running at once (each sends four announces).
const MAX_CHECKS: usize = 16;

/// Largest datagram on 7946, envelope included.
pub const MAX_DATAGRAM: usize = 1400;

/// Largest push-pull frame accepted (sealed), about 80,000 members with their records.
pub const MAX_PUSHPULL_FRAME: usize = 16 << 20;

/// How far ahead of our wall clock an envelope epoch (the sender's start time) may be.
pub const MAX_EPOCH_AHEAD: Duration = Duration::from_secs(600);

/// A new entry (ours, or one first heard in a datagram) makes the core gossip at once, but
/// at most once per this span (a burst of entries shares the rounds).
pub const EAGER_SPACING: Duration = Duration::from_millis(10);

/// Eager gossip rounds after a new entry, [`EAGER_SPACING`] apart. With `k` members per
/// round (`num_indirect_probes`, five in `Config::lan`), every node that hears a change
/// sends it to `k * EAGER_ROUNDS` members at once: a node then misses every copy with
/// probability about `e^-(k * EAGER_ROUNDS)` and waits for the next gossip period (200 ms).
/// With one round, at N = 200 three changes in four left such a straggler (e^-5 per node).
/// An entry gets `k` more transmissions than a record for it (see `queue_entry`).
pub const EAGER_ROUNDS: u8 = 2;

/// Most entries new to us that one push-pull state makes us spread on (as if heard in a
/// datagram); the rest wait for the next push-pulls. None from our first state (a join: the
/// others hold them all).
pub const MAX_STATE_RELAY: usize = 256;

/// Our own entries are sent again (when we learn we were declared down) at most once per
/// this span: several members tell us, one after the other.
pub const RESEND_HOLD: Duration = Duration::from_secs(1);

/// After we renew our identity, a member's "you are down" (TurnUndead) is refused for this
/// long: one member alone cannot make us churn identities faster than this. (A TurnUndead
/// about our previous identity never reaches this point: foca drops what is addressed to an
/// identity that is no longer ours.)
pub const RENEW_HOLD: Duration = Duration::from_secs(10);

/// Tuning of the gossip core. Start from [`Config::lan`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The SWIM parameters handed to foca (its `suspect_to_down_after` is replaced by
    /// `suspicion_min`, its `max_packet_size` by [`MAX_DATAGRAM`] minus the envelope).
    pub swim: foca::Config,
    /// Lifeguard local health on (the default) or off (plain SWIM timers).
    pub local_health: bool,
    /// Dynamic suspicion on (the default): a member whose probe fails broadcasts an
    /// independent-witness item, the suspicion timeout shrinks from `suspicion_max` towards
    /// `suspicion_min` as witnesses accumulate, and a quorum of witnesses lets any member
    /// declare the suspect down. Off (plain SWIM): no witness items, no quorum, every
    /// suspicion waits `suspicion_max`.
    pub dynamic_suspicion: bool,
    /// Lifeguard's buddy system on (the default): a probe to a member we hold as suspect
    /// carries that suspicion. Off (plain SWIM): probes carry only the usual piggybacked
    /// updates.
    pub buddy_system: bool,
    /// Highest health score; timers stretch at most `1 + max_health` times.
    pub max_health: u32,
    /// Suspicion timeout with `suspicion_k` or more independent confirmations.
    pub suspicion_min: Duration,
    /// Suspicion timeout with no independent confirmation.
    pub suspicion_max: Duration,
    /// Confirmations needed to reach `suspicion_min`.
    pub suspicion_k: u32,
    /// How many members, on average, check a fresh suspicion themselves (confirmation
    /// probes: four announces 200 ms apart; no answer within 900 ms makes them independent
    /// witnesses, which shortens the suspicion timeout). 0 turns it off.
    pub confirm_probes: u32,
    /// Mean time between two periodic push-pull exchanges started by this node (jittered
    /// uniformly in 0.5x..1.5x).
    pub pushpull_interval: Duration,
    /// Flap damping (with dynamic suspicion): for this long after we saw a member go down,
    /// a suspicion of it waits the whole `suspicion_max` (no quorum, no shortening by
    /// witnesses), and each such suspicion that reaches us from another member starts the
    /// period again. A host that pauses for a few seconds again and again (a stalled VM,
    /// long GC pauses) is declared down once, not at every pause; a member never seen down keeps the fast path. While three or
    /// more members, and a tenth or more, went down within the period (a partition), nobody
    /// is damped. `None`: off.
    pub flap_damping: Option<Duration>,
    /// How long an author may stay down before its entries are dropped (with
    /// [`Event::Entry`] removals). An author that left, or is removed from the directory,
    /// loses them at once.
    pub entries_down_grace: Duration,
    /// How long a tombstone (a deleted entry) is kept, so that older copies still travelling
    /// are recognized as stale. A node cut off for longer than this that still holds the
    /// deleted value can bring it back; its author then sees it as an [`Event::Entry`] of
    /// its own and deletes it again.
    pub tombstone_ttl: Duration,
    /// Most entries (tombstones included) held per author. Our own beyond it are refused
    /// ([`ApiError::TooManyEntries`]), others' counted (`entries_over_limit`); every node
    /// should use the same value.
    pub max_entries_per_author: usize,
}

impl Config {
    /// Parameters for a LAN cluster of about `cluster_size` nodes, 1 s probe period.
    ///
    /// Chosen from foca's `Config::new_lan` (itself memberlist's LAN defaults) and tuned in
    /// the simulation (see `README.md`):
    /// - probe period 1 s, probe RTT 400 ms, 5 indirect probes (3 in foca and memberlist);
    /// - gossip every 200 ms to 3 members while updates are pending; each update sent
    ///   `4 * log10(n + 1) + 4` times (16 at n = 1000);
    /// - suspicion from `max = 4 * log10(n)` s (at least 8 s; 12 s at n = 1000) down to
    ///   `min = log10(n) / 2` s (at least 1.5 s) with two independent confirmations
    ///   (Lifeguard's dynamic suspicion), instead of memberlist's fixed `4 * log10(n)` s: a
    ///   crashed node is confirmed by every prober within seconds, a healthy node suspected
    ///   through one lost packet keeps the long timeout and refutes in time;
    /// - push-pull once per `max(30 s, n * 0.6 s)` per node: a full state is about 120 bytes
    ///   per member, so this keeps its share near 400 bytes/s per node at any size;
    /// - announce (ask one member for a feed of others) every 60 s;
    /// - announce to down members every 20 s (2 members): with push-pull it heals
    ///   partitions;
    /// - flap damping for `5 * suspicion_max` (60 s at n = 1000) after a member is seen
    ///   down: a member that went down and came back gets the full `suspicion_max` for its
    ///   next suspicions;
    /// - entries: dropped 30 s after their author went down, tombstones kept 120 s, at most
    ///   4096 per author.
    pub fn lan(cluster_size: u32) -> Self {
        let n = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut swim = foca::Config::new_lan(n);
        swim.probe_rtt = Duration::from_millis(400);
        // Five indirect probes instead of three: at 10 % loss an indirect path (four legs)
        // fails with p = 0.34, so a healthy member is suspected after 0.19 * 0.34^k of its
        // probes; k = 5 makes that 0.09 % instead of 0.77 %, and each suspicion costs every
        // node a suspect, a refutation and a witness item, each sent max_transmissions
        // times. The extra PingReqs go out only after a missed direct ack.
        swim.num_indirect_probes = NonZeroUsize::new(5).unwrap_or(NonZeroUsize::MIN);
        // foca sends each update 4 * log10(n + 1) times; four more make a node that misses
        // every copy (probability about e^-tx) rare even at 200 nodes.
        swim.max_transmissions = swim.max_transmissions.saturating_add(4);
        swim.max_packet_size =
            NonZeroUsize::new(MAX_DATAGRAM - OVERHEAD).unwrap_or(NonZeroUsize::MIN);
        swim.remove_down_after = Some(Duration::from_secs(3600));
        swim.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(60),
            num_members: NonZeroUsize::MIN,
        });
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(20),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        let log = f64::from(cluster_size.max(10)).log10();
        let suspicion_max = Duration::from_secs_f64((log * 4.0).max(8.0));
        Config {
            swim,
            local_health: true,
            dynamic_suspicion: true,
            buddy_system: true,
            max_health: 8,
            suspicion_min: Duration::from_secs_f64((log * 0.5).max(1.5)),
            suspicion_max,
            suspicion_k: 2,
            confirm_probes: 5,
            pushpull_interval: Duration::from_secs_f64((f64::from(cluster_size) * 0.6).max(30.0)),
            flap_damping: Some(suspicion_max * 5),
            entries_down_grace: Duration::from_secs(30),
            tombstone_ttl: Duration::from_secs(120),
            max_entries_per_author: 4096,
        }
    }

    /// Plain SWIM, the baseline the Lifeguard paper compares against (memberlist without
    /// Lifeguard, the SWIM paper's protocol): [`Config::lan`] with all three Lifeguard parts
    /// off and foca's 3 indirect probes:
    /// - no local health (`local_health` off: probe period, probe RTT and suspicion timeout
    ///   never stretch; a late timer is not deferred; a slow node still acts on its own
    ///   observations);
    /// - a fixed suspicion timeout, memberlist's `suspicion_mult * max(1, log10(n)) *
    ///   probe_interval` with `suspicion_mult = 4` and a 1 s probe period (foca's
    ///   `Config::new_lan` computes the same): 9.2 s at n = 200, 10.8 s at 500, 12 s at
    ///   1000. `suspicion_min = suspicion_max` = that value, `dynamic_suspicion` off (no
    ///   witness items, no quorum), `confirm_probes` 0;
    /// - no buddy system (`buddy_system` off);
    /// - 3 indirect probes (foca's and memberlist's default; [`Config::lan`] uses 5).
    ///
    /// Everything else (probe period and RTT, gossip fan-out and transmissions, push-pull,
    /// announces, the TurnUndead fix, codec, sealing, metadata) is as in [`Config::lan`].
    pub fn plain_swim(cluster_size: u32) -> Self {
        let mut c = Config::lan(cluster_size);
        let n = NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN);
        let fixed = foca::Config::new_lan(n).suspect_to_down_after;
        c.swim.num_indirect_probes = NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN);
        c.local_health = false;
        c.dynamic_suspicion = false;
        c.buddy_system = false;
        c.confirm_probes = 0;
        c.flap_damping = None;
        c.suspicion_min = fixed;
        c.suspicion_max = fixed;
        c
    }
}

/// A member's state as seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Up,
    /// Failed a probe; will be declared down unless it refutes.
    Suspect,
    /// Declared down (or left).
    Down,
}

/// What the driver and the control plane learn about a member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberInfo {
    /// The node ID.
    pub id: NodeId,
    /// Its gossip address.
    pub addr: SocketAddr,
    /// Its identity generation (rises each time it restarts).
    pub bump: u32,
    /// Its SWIM incarnation as we hold it (rises each time it refutes a suspicion; a member
    /// declared down comes back at a higher one).
    pub incarnation: u16,
    /// Its state.
    pub state: MemberState,
    /// Its metadata; always `Some` in an [`Event`], `None` in [`Membership::members`] until
    /// the metadata has arrived.
    pub metadata: Option<Metadata>,
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A live entry, as [`Membership::entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntryInfo {
    /// The node whose table it belongs to (who signed it).
    pub author: NodeId,
    /// The key.
    pub key: Vec<u8>,
    /// Its version.
    pub version: u64,
    /// The value.
    pub value: Vec<u8>,
}

/// Membership changes and entry changes, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member is up and its metadata is known.
    Up(MemberInfo),
    /// A member that was up was declared down.
    Down(MemberInfo),
    /// An up member changed its metadata or address.
    Updated(MemberInfo),
    /// An up member left on purpose.
    Left(MemberInfo),
    /// The entry held for (`author`, `key`) changed: set, replaced by a higher version,
    /// deleted (a tombstone arrived: `value` is `None`), or dropped with its author (`None`
    /// at the version last held; the author left, was removed from the directory, or stayed
    /// down for [`Config::entries_down_grace`]). Every change is reported once, in order;
    /// our own [`Membership::set_entry`] calls included. An entry of our own that arrives
    /// from others (an earlier run's, or a deleted one whose tombstone was forgotten) is
    /// reported too: set it again, or delete it, with a higher version.
    Entry {
        /// The node whose table changed.
        author: NodeId,
        /// The key.
        key: Vec<u8>,
        /// The version now held (or last held, for a drop).
        version: u64,
        /// The value, `None` when deleted or dropped.
        value: Option<Vec<u8>>,
    },
}

/// Counters, all since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Datagrams received (before any check).
    pub datagrams_in: u64,
    /// Datagrams received that opened: sealed for us by an admitted sender under a live gossip
    /// key (counted before the checks after opening: replay, spoofing, decoding).
    pub datagrams_opened: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Bytes of datagrams received.
    pub bytes_in: u64,
    /// Bytes of datagrams sent (sealed).
    pub bytes_out: u64,
    /// Bytes of push-pull frames received (sealed).
    pub stream_bytes_in: u64,
    /// Bytes of push-pull frames sent (sealed).
    pub stream_bytes_out: u64,
    /// Dropped: did not open (no live gossip key with its id, or no candidate sender's pair
    /// key opened it: wrong key, tampered, or a member posing as another).
    pub dropped_seal: u64,
    /// Dropped: the sender tag names no member of the directory, or a relayed record, signed
    /// item or push-pull entry is about (or by) a node not in it.
    pub dropped_not_admitted: u64,
    /// Dropped: opened but did not decode.
    pub dropped_decode: u64,
    /// Dropped: a datagram seen before, too far behind its sender's newest, or from an
    /// earlier run of its sender (replay protection).
    pub dropped_replay: u64,
    /// Dropped: larger than [`MAX_DATAGRAM`].
    pub dropped_oversize: u64,
    /// Rejected by foca (from ourselves, stale, out of order).
    pub dropped_protocol: u64,
    /// Push-pull exchanges applied.
    pub pushpull_applied: u64,
    /// Probes of ours that failed.
    pub probes_failed: u64,
    /// Members we declared down ourselves (our suspicion timer expired).
    pub declared_down: u64,
    /// Current local health score (0 is healthy).
    pub health: u32,
    /// Timers fired (each is one lateness sample below).
    pub timers_fired: u64,
    /// Sum of how late those timers fired after their deadlines, in microseconds: the time
    /// this node could not run (a stalled runtime, a blocked thread). With the count: the
    /// mean. A timer more than half a probe period late raises local health.
    pub timer_late_sum_us: u64,
    /// The latest any timer fired after its deadline, in microseconds.
    pub timer_late_max_us: u64,
    /// Direct probes answered (each gives one round-trip sample).
    pub probe_rtt_count: u64,
    /// Sum of those round trips, in microseconds (with the count: the mean).
    pub probe_rtt_sum_us: u64,
    /// The latest round trip, in microseconds.
    pub probe_rtt_last_us: u64,
    /// Dropped: the foca header of an opened datagram names another sender than the one
    /// whose pair key opened it, or a push-pull answer came from another node than the one
    /// asked.
    pub dropped_spoofed: u64,
    /// Dropped: the envelope epoch (the sender's start, wall-clock milliseconds) is more than
    /// [`MAX_EPOCH_AHEAD`] ahead of our wall clock.
    pub dropped_future: u64,
    /// Not sent: the destination is in no directory entry (or its X25519 key is unusable),
    /// so nothing can be sealed for it.
    pub dropped_unsealable: u64,
    /// Dropped: a member's "you are down" (TurnUndead) within [`RENEW_HOLD`] of our last
    /// identity renewal.
    pub dropped_renewal: u64,
    /// Relayed member records dropped: they said more of a member (identity, incarnation)
    /// than the member itself stated. Some are only early (the member's signed record is on
    /// its way), and applied when it arrives.
    pub records_dropped: u64,
    /// Relayed `Down` records turned into `Suspect`: only a member's own word, a quorum of
    /// signed witnesses or our own suspicion timer declares it down.
    pub records_rewritten: u64,
    /// Signed items (node records, witnesses) whose signature did not verify under the
    /// directory's key of their author.
    pub items_bad_signature: u64,
    /// Members we held down and took back up: their signed record refuted, at a higher
    /// incarnation, the suspicion that had them declared down.
    pub revived: u64,
    /// Witnesses dropped without verifying: they suspect a (bump, incarnation) their subject
    /// never stated.
    pub items_unproven: u64,
    /// TCP (push-pull) connections refused at accept: their source IP already held its share
    /// of connections not yet authenticated (driver only).
    pub tcp_refused_per_ip: u64,
    /// TCP connections refused at accept: the cap on all connections not yet authenticated
    /// was reached (driver only).
    pub tcp_refused_global: u64,
    /// TCP connections closed because no complete first frame came within the deadline
    /// (driver only).
    pub tcp_first_frame_timeout: u64,
    /// TCP connections closed after their first frame opened, because every exchange slot
    /// was busy (driver only).
    pub tcp_refused_busy: u64,
    /// Entries received from others (datagrams, push-pull, restore), before any check.
    pub entries_received: u64,
    /// Received entries that changed what we hold (each one [`Event::Entry`]).
    pub entries_applied: u64,
    /// Of those, the ones that came in a push-pull state or a restore: changes whose
    /// broadcasts missed us (loss, a partition, a restart).
    pub entries_from_pushpull: u64,
    /// Received entries no newer than the one held for their (author, key): copies, or
    /// older versions.
    pub entries_stale: u64,
    /// Received entries whose signature did not verify under their author's directory key
    /// (forged or altered).
    pub entries_bad_signature: u64,
    /// Received entries over the size limits (the datagram's or state's decoding stops
    /// there).
    pub entries_too_big: u64,
    /// Received entries refused: a new key of an author holding
    /// [`Config::max_entries_per_author`] already.
    pub entries_over_limit: u64,
    /// Received entries refused: their author left, or has been down for
    /// [`Config::entries_down_grace`] (it sends them again when it is back).
    pub entries_refused_gone: u64,
    /// Live entries dropped with their author (left, removed, or down past the grace).
    pub entries_dropped: u64,
    /// Entries left out of a push-pull state that would otherwise exceed
    /// [`MAX_PUSHPULL_FRAME`] (others' first; the peer gets them by gossip or later).
    pub entries_pushpull_omitted: u64,
    /// Entries dropped from the send queue before they were sent their transmissions (more
    /// than it holds at once; push-pull repairs).
    pub entries_queue_evicted: u64,
}

/// Why a datagram was dropped. Every variant is counted in [`Stats`].
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Larger than [`MAX_DATAGRAM`].
    #[error("gossip datagram of {0} bytes exceeds the 1400-byte limit; dropped")]
    Oversize(usize),
    /// Did not open.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The foca header names another sender than the one that sealed the datagram.
    #[error("gossip datagram sealed by node {sender} claims to come from {claimed}; dropped")]
    Spoofed {
        /// Who the header names.
        claimed: NodeId,
        /// Who sealed it.
        sender: NodeId,
    },
    /// The envelope epoch is implausibly far ahead of our wall clock.
    #[error("gossip datagram from node {sender} started {ahead_s} s in our future; dropped (check both clocks)")]
    FutureEpoch {
        /// Who sealed it.
        sender: NodeId,
        /// How far ahead, in seconds.
        ahead_s: u64,
    },
    /// A "you are down" too soon after our last identity renewal.
    #[error("gossip: node {0} says we are down again within 10 s of our last renewal; ignored")]
    RenewalHeld(NodeId),
    /// Replayed (or duplicated, or far out of order).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// foca refused it.
    #[error("gossip datagram refused by the SWIM state machine: {0}")]
    Protocol(String),
}

/// Why a push-pull frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum PushPullError {
    /// Larger than [`MAX_PUSHPULL_FRAME`].
    #[error("push-pull frame of {0} bytes exceeds the limit; dropped")]
    Oversize(usize),
    /// Did not open.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Sealing our frame failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The answer came from another node than the one asked.
    #[error("push-pull answer from node {sender} on an exchange with {expected}; dropped")]
    Spoofed {
        /// Whom we asked.
        expected: NodeId,
        /// Who sealed the answer.
        sender: NodeId,
    },
    /// The envelope epoch is implausibly far ahead of our wall clock.
    #[error("push-pull frame from node {0} started in our future; dropped (check both clocks)")]
    FutureEpoch(NodeId),
}

/// Why an API call failed; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The metadata is out of bounds.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The metadata's public key is not the X25519 key of our node keys.
    #[error("gossip metadata carries another X25519 public key than this node's keys; pass the node's own public key")]
    KeyMismatch,
    /// foca refused the call.
    #[error("the SWIM state machine refused the call: {0}")]
    Protocol(String),
    /// The entry's key or value is too large.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The version is not higher than the one we hold for that key (ours from this run, or
    /// from an earlier run, learnt from others).
    #[error("gossip entry version {version} is not higher than the {held} held for that key; pass a higher version")]
    StaleVersion {
        /// The version given.
        version: u64,
        /// The version held.
        held: u64,
    },
    /// We hold [`Config::max_entries_per_author`] entries of our own already (tombstones
    /// count until they are forgotten).
    #[error("this node holds {0} gossip entries already, the most allowed; delete some and wait for their tombstones to expire")]
    TooManyEntries(usize),
    /// We left the cluster: nobody takes our entries any more.
    #[error("this node left the gossip cluster; its entries are no longer taken")]
    Left,
}

/// A peer to run a push-pull exchange with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its node ID (the frame is sealed for it).
    pub id: NodeId,
    /// Its gossip address (TCP).
    pub addr: SocketAddr,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dst: SocketAddr,
    /// The sealed bytes, at most [`MAX_DATAGRAM`].
    pub data: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// shared state between Membership and foca's broadcast handler

/// What we know of an authenticated sender: its anti-replay window and the highest
/// (identity, incarnation) its own datagram headers stated.
#[derive(Debug, Clone, Copy)]
struct Sender {
    window: ReplayWindow,
    identity: Identity,
    incarnation: u16,
}

/// Whether `a` is a later statement than `b`: a newer bump, or the same identity at a higher
/// incarnation.
fn later(a: (Identity, u16), b: (Identity, u16)) -> bool {
    a.0.newer_than(&b.0) || (a.0 == b.0 && a.1 > b.1)
}

/// Whether a record about `ident` at `incarnation` is within what its subject stated: the
/// same identity (node, address, bump) at an incarnation no higher.
fn within(stated: Option<(Identity, u16)>, ident: &Identity, incarnation: u16) -> bool {
    stated.is_some_and(|(s, si)| s == *ident && incarnation <= si)
}

/// Counters of the broadcast handler (it runs inside foca).
#[derive(Debug, Default, Clone, Copy)]
struct ItemCounts {
    not_admitted: u64,
    bad_signature: u64,
    unproven: u64,
    entries_too_big: u64,
}

#[derive(Debug)]
struct Shared {
    admission: Admission,
    crypto: Arc<dyn Crypto>,
    /// Signed records and up state per member.
    peers: Peers,
    /// Per authenticated sender: replay window and what its headers stated.
    senders: HashMap<NodeId, Sender>,
    /// Members whose metadata changed (events to emit).
    changed: Vec<NodeId>,
    confirms: HashMap<(NodeId, u32, u16), HashSet<NodeId>>,
    /// Suspicions we just heard of for the first time: candidates for a confirmation probe.
    fresh_suspects: Vec<(Identity, u16)>,
    /// Suspicions that just reached a quorum of independent witnesses.
    quorums: Vec<(Identity, u16)>,
    /// Records just accepted: applied to foca where they say more than it holds.
    raised: Vec<Arc<NodeRecord>>,
    /// Records just accepted from gossip: to spread on (see [`RecordQueue`]).
    relay: Vec<Arc<NodeRecord>>,
    /// Witnesses just accepted from gossip: to spread on.
    relay_witnesses: Vec<Item>,
    /// Entries in the datagram being handled, checked by the core once foca is done with
    /// it (see [`Membership::take_entries`]). At most a datagram's worth.
    entries_in: Vec<Arc<Entry>>,
    /// Our own identity and incarnation (what we stated last).
    own: (Identity, u16),
    counts: ItemCounts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ItemKey {
    Node { id: NodeId, seq: u64 },
    Suspect(NodeId, u32, u16, NodeId),
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (ItemKey::Node { id, seq }, ItemKey::Node { id: o, seq: os }) => {
                id == o && !seq_after(*os, *seq)
            }
            // A witness about a later generation or incarnation of the same member makes the
            // witnesses about earlier ones useless (that suspicion was refuted or the member
            // rejoined): drop them from the queue instead of spreading them on.
            (ItemKey::Suspect(id, b, i, _), ItemKey::Suspect(o, ob, oi, _)) if id == o => {
                crate::relay::after(*b, *i, *ob, *oi) || self == other
            }
            (a, b) => a == b,
        }
    }
}

struct Handler {
    shared: Arc<Mutex<Shared>>,
    me: NodeId,
}

/// Error handed to foca for a custom broadcast that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("custom broadcast item: {0}")]
pub struct ItemError(#[from] DecodeError);

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A poisoned lock only means another thread panicked while holding it; the data is
    // plain counters and maps, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BroadcastHandler<Identity> for Handler {
    type Key = ItemKey;
    type Error = ItemError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Identity>,
    ) -> Result<Option<ItemKey>, ItemError> {
        let item = Item::decode(data).inspect_err(|e| {
            if codec::is_oversize_entry(e) {
                lock(&self.shared).counts.entries_too_big += 1;
            }
        })?;
        if sender.is_none() {
            // Our own item, added through `add_broadcast`: always spread it.
            return Ok(match item {
                Item::Node(r) => Some(ItemKey::Node {
                    id: r.subject.id,
                    seq: r.seq,
                }),
                Item::Suspect {
                    subject,
                    incarnation,
                    from,
                    ..
                } => Some(ItemKey::Suspect(
                    subject.id,
                    subject.bump,
                    incarnation,
                    from,
                )),
                // Entries never go through foca's queue.
                Item::Entry(_) => None,
            });
        }
        let mut sh = lock(&self.shared);
        match item {
            // Entries are checked and spread by the core, once foca is done.
            Item::Entry(e) => {
                sh.entries_in.push(e);
                Ok(None)
            }
            // Records are spread by the core itself, ahead of foca's updates.
            Item::Node(rec) => {
                if sh.accept_record(Arc::clone(&rec), self.me).is_some() {
                    sh.relay.push(rec);
                }
                Ok(None)
            }
            // So are witnesses (a refutation ends them there).
            item => {
                if sh.accept_item(item.clone(), self.me).is_some() {
                    sh.relay_witnesses.push(item);
                }
                Ok(None)
            }
        }
    }
}

impl Shared {
    /// The highest (identity, incarnation) `id` stated itself: in its signed records or in
    /// its own datagram headers.
    fn stated(&self, id: &NodeId) -> Option<(Identity, u16)> {
        let rec = self.peers.record(id).map(|r| (r.subject, r.incarnation));
        let hdr = self.senders.get(id).map(|s| (s.identity, s.incarnation));
        match (rec, hdr) {
            (Some(r), Some(h)) => Some(if later(h, r) { h } else { r }),
            (r, h) => r.or(h),
        }
    }

    /// Takes a signed record received from someone else (gossip, push-pull, restore). Checks
    /// the cheap things first: the author is in the directory, the record is newer than what
    /// we hold (so each (node, seq) is verified once); then the signature, under the
    /// directory's keys.
    fn accept_record(&mut self, rec: Arc<NodeRecord>, me: NodeId) -> Option<ItemKey> {
        let id = rec.subject.id;
        if id == me {
            return None;
        }
        let Some(keys) = self.admission.keys(&id).copied() else {
            self.counts.not_admitted += 1;
            return None;
        };
        let known = self.peers.record(&id);
        if known.is_some_and(|k| !seq_after(rec.seq, k.seq)) || rec.meta.validate().is_err() {
            return None;
        }
        let msg = rec.signed_bytes(&keys.x25519);
        if !self.crypto.verify(&keys.ed25519, &msg, &rec.sig) {
            self.counts.bad_signature += 1;
            return None;
        }
        let meta_changed = self.peers.record(&id).is_none_or(|k| {
            let mut m = rec.meta.clone();
            m.public_key = keys.x25519;
            k.meta != m
        });
        // The wire leaves the key out; what we hold carries the directory's (which the
        // signature covered).
        let rec = if rec.meta.public_key == keys.x25519 {
            rec
        } else {
            let mut r = NodeRecord::clone(&rec);
            r.meta.public_key = keys.x25519;
            Arc::new(r)
        };
        let key = ItemKey::Node { id, seq: rec.seq };
        self.peers.set_record(id, Arc::clone(&rec));
        if meta_changed {
            self.changed.push(id);
        }
        self.raised.push(rec);
        Some(key)
    }

    fn accept_item(&mut self, item: Item, me: NodeId) -> Option<ItemKey> {
        match item {
            Item::Node(rec) => self.accept_record(rec, me),
            Item::Entry(_) => None,
            Item::Suspect {
                subject,
                incarnation,
                from,
                sig,
            } => {
                let Some(keys) = self.admission.keys(&from).copied() else {
                    self.counts.not_admitted += 1;
                    return None;
                };
                if !self.admission.admits(&subject.id) {
                    self.counts.not_admitted += 1;
                    return None;
                }
                // Only an incarnation the subject really had can be suspected.
                let stated = if subject.id == me {
                    Some(self.own)
                } else {
                    self.stated(&subject.id)
                };
                if !within(stated, &subject, incarnation) {
                    if stated.is_some_and(|s| later(s, (subject, incarnation))) {
                        // Refuted (or superseded) already: worth nothing, and not a lie.
                        return None;
                    }
                    self.counts.unproven += 1;
                    return None;
                }
                if self
                    .confirms
                    .get(&(subject.id, subject.bump, incarnation))
                    .is_some_and(|set| set.contains(&from) || set.len() >= QUORUM)
                {
                    // Known witness, or past the quorum (more witnesses change nothing
                    // anywhere: each node spreads the first QUORUM it heard). No signature
                    // check needed to ignore it.
                    return None;
                }
                let msg = suspect_signed_bytes(&subject, incarnation, &from);
                if !self.crypto.verify(&keys.ed25519, &msg, &sig) {
                    self.counts.bad_signature += 1;
                    return None;
                }
                Some(self.witness(subject, incarnation, from, me)?)
            }
        }
    }

    /// Counts an independent witness (already authenticated, or our own).
    fn witness(
        &mut self,
        subject: Identity,
        incarnation: u16,
        from: NodeId,
        me: NodeId,
    ) -> Option<ItemKey> {
        if self.confirms.len() > 8192 {
            self.confirms.clear();
        }
        let set = self
            .confirms
            .entry((subject.id, subject.bump, incarnation))
            .or_default();
        if set.is_empty() && subject.id != me {
            self.fresh_suspects.push((subject, incarnation));
        }
        if !set.insert(from) {
            return None;
        }
        if set.len() == QUORUM {
            self.quorums.push((subject, incarnation));
        }
        if set.len() > QUORUM {
            return None;
        }
        Some(ItemKey::Suspect(
            subject.id,
            subject.bump,
            incarnation,
            from,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// runtime adapter and timers

#[derive(Default)]
struct Collect {
    sends: Vec<(Identity, Vec<u8>)>,
    timers: Vec<(Duration, Timer<Identity>)>,
    notes: Vec<OwnedNotification<Identity>>,
}

impl Runtime<Identity> for Collect {
    fn notify(&mut self, n: foca::Notification<'_, Identity>) {
        match n {
            foca::Notification::DataReceived(_) | foca::Notification::DataSent(_) => {}
            n => self.notes.push(n.to_owned()),
        }
    }
    fn send_to(&mut self, to: Identity, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<Identity>, after: Duration) {
        self.timers.push((after, event));
    }
}

struct Pending {
    deadline: Instant,
    seq: u64,
    created: Instant,
    deferred: bool,
    /// Our own timer for a suspicion relayed to us (see [`Membership::arm_suspicions`]),
    /// not one foca armed for its own failed probe.
    relayed: bool,
    timer: Timer<Identity>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> Ordering {
        // min-heap on (deadline, seq)
        (o.deadline, o.seq).cmp(&(self.deadline, self.seq))
    }
}

type SwimCore = Foca<Identity, Codec, SmallRng, Handler>;

/// The sans-IO gossip core. See the module docs for the call order.
pub struct Membership {
    foca: SwimCore,
    config: Config,
    shared: Arc<Mutex<Shared>>,
    sealer: Sealer,
    rng: SmallRng,
    timers: BinaryHeap<Pending>,
    timer_seq: u64,
    transmits: VecDeque<Transmit>,
    pushpulls: VecDeque<Peer>,
    /// Signed records to spread, ours and relayed (see [`RecordQueue`]).
    records: RecordQueue,
    /// Every entry held, ours included.
    entries: Table,
    /// When the next eager gossip round for new entries may go (see [`EAGER_SPACING`]).
    eager_at: Option<Instant>,
    /// When the last one went.
    eager_last: Option<Instant>,
    /// Eager rounds still to go for the entries queued last.
    eager_rounds: u8,
    /// When to send our own entries again (see [`RESEND_HOLD`]).
    resend_at: Option<Instant>,
    /// When they were last sent again.
    resent_last: Option<Instant>,
    /// We applied a push-pull state (or restored one) already: the entries new to us in the
    /// next ones are changes some nodes missed, worth spreading on.
    synced: bool,
    events: VecDeque<Event>,
    /// The directory (also in `shared`, for the broadcast handler).
    admission: Admission,
    /// Our keys (also in `shared`).
    crypto: Arc<dyn Crypto>,
    my_meta: Arc<Metadata>,
    my_seq: u64,
    /// Our latest signed record.
    my_record: Arc<NodeRecord>,
    /// Our SWIM incarnation, as our own datagram headers carry it.
    my_incarnation: u16,
    /// We left on purpose: every record we sign says so.
    left: bool,
    meta_sent: bool,
    /// When we last answered a "you are down" (see [`RENEW_HOLD`]).
    renewed: Option<Instant>,
    /// A "you are down" arrived: refute once foca has handled the datagram.
    refute: bool,
    /// Wall clock (milliseconds since the Unix epoch) at the instant `wall_at`.
    wall_ms: u64,
    wall_at: Instant,
    health: u32,
    last_suspected: Option<u16>,
    stall_counted: bool,
    next_pushpull: Option<Instant>,
    checks: HashMap<NodeId, Check>,
    /// When we first heard of each suspicion (for the quorum rule's minimum wait).
    heard: HashMap<(NodeId, u32, u16), Instant>,
    /// Flap damping: when we last saw each member go down, or suspected it while damped.
    flapped: HashMap<NodeId, Flapped>,
    /// When `flapped` was last pruned.
    flapped_pruned: Option<Instant>,
    /// Quorum declarations waiting for `suspicion_min` to pass.
    declares: Vec<(Instant, Identity, u16)>,
    /// Suspicions relayed to us (records that passed the rules) since the last input: each
    /// gets our own suspicion timer once foca holds it (see [`Membership::arm_suspicions`]).
    relayed_suspicions: Vec<(Identity, u16)>,
    /// Suspicions we armed a timer for (bounded).
    armed: HashSet<(NodeId, u32, u16)>,
    /// foca's current timer token, read from the timers it submits.
    timer_token: Option<foca::TimerToken>,
    /// Members we heard are suspected (pruned lazily): probes to them carry the suspicion
    /// (Lifeguard's buddy system).
    suspects: HashSet<NodeId>,
    /// Direct probes sent and not yet acknowledged, for the round-trip figures.
    pings: HashMap<(NodeId, u8), Instant>,
    /// Debug notes (the simulation's `--debug`); `None` when off.
    notes: Option<Vec<String>>,
    /// What is being handled, for the debug notes.
    ctx: String,
    stats: Stats,
}

/// Flap damping's memory of a member: when it was last seen down (or suspected while
/// damped), and the identity and incarnation it went down at. Only suspicions of a later
/// incarnation are damped: the one that had it declared down, still running here, is not.
#[derive(Debug, Clone, Copy)]
struct Flapped {
    at: Instant,
    down: (Identity, u16),
    /// Seen (or declared) down, not only suspected by a quorum: counts towards the
    /// many-downs rule of [`Membership::damped`].
    counted: bool,
}

/// A confirmation probe in flight.
#[derive(Debug, Clone, Copy)]
struct Check {
    subject: Identity,
    incarnation: u16,
    sends_left: u8,
    next_send: Instant,
    deadline: Instant,
    /// Declare the subject down if it stays silent (a suspicion someone else raised, whose
    /// time is up or which someone already declared): our own observation is what declares.
    declare: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("identity", self.foca.identity())
            .field("members", &self.foca.num_members())
            .finish_non_exhaustive()
    }
}

/// Everything [`Membership::new`] needs.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Tuning.
    pub config: Config,
    /// Our identity (pick a bump higher than any earlier run's).
    pub identity: Identity,
    /// Our metadata.
    pub metadata: Metadata,
    /// Gossip keys.
    pub keyring: Keyring,
    /// Who may take part, with their public keys.
    pub admission: Admission,
    /// Our node keys (the production [`crate::auth::NodeKeys`], or the simulation's cached
    /// wrapper). `metadata.public_key` must be its X25519 public key.
    pub crypto: Arc<dyn Crypto>,
    /// Seed for every random choice of the core.
    pub seed: u64,
    /// Rises with every start of this agent (the driver uses the wall clock in
    /// milliseconds): peers refuse datagrams sealed by an earlier run (replay protection).
    pub epoch: u64,
    /// Fresh random bits for every start (with `epoch`, makes the envelope nonces unique).
    pub salt: u64,
    /// The wall clock, in milliseconds since the Unix epoch, at the `now` given to
    /// [`Membership::new`] (then kept with [`Membership::set_wall_clock`]). Envelope epochs
    /// more than [`MAX_EPOCH_AHEAD`] beyond it are refused.
    pub wall_ms: u64,
}

impl Membership {
    /// A new core at time `now`; call [`Membership::join`] to reach the cluster.
    pub fn new(setup: Setup, now: Instant) -> Result<Self, ApiError> {
        setup.metadata.validate()?;
        if setup.metadata.public_key != setup.crypto.public().x25519 {
            return Err(ApiError::KeyMismatch);
        }
        let me = setup.identity.id;
        let my_seq = u64::from(setup.identity.bump) << 32;
        let my_record = Arc::new(NodeRecord::signed(
            setup.identity,
            0,
            my_seq,
            false,
            setup.metadata.clone(),
            setup.crypto.as_ref(),
        ));
        let shared = Arc::new(Mutex::new(Shared {
            admission: setup.admission.clone(),
            crypto: Arc::clone(&setup.crypto),
            peers: Peers::default(),
            senders: HashMap::new(),
            changed: Vec::new(),
            confirms: HashMap::new(),
            fresh_suspects: Vec::new(),
            quorums: Vec::new(),
            raised: Vec::new(),
            relay: Vec::new(),
            relay_witnesses: Vec::new(),
            entries_in: Vec::new(),
            own: (setup.identity, 0),
            counts: ItemCounts::default(),
        }));
        let mut swim = setup.config.swim.clone();
        swim.suspect_to_down_after = setup.config.suspicion_min.max(Duration::from_millis(1));
        let foca = Foca::with_custom_broadcast(
            setup.identity,
            swim,
            SmallRng::seed_from_u64(setup.seed),
            Codec,
            Handler {
                shared: Arc::clone(&shared),
                me,
            },
        );
        let m = Membership {
            foca,
            config: setup.config,
            shared,
            sealer: Sealer::new(me, setup.keyring, setup.epoch, setup.salt),
            rng: SmallRng::seed_from_u64(setup.seed ^ 0x5eed_0f0a_11aa),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            transmits: VecDeque::new(),
            pushpulls: VecDeque::new(),
            records: RecordQueue::new(me),
            entries: Table::default(),
            eager_at: None,
            eager_last: None,
            eager_rounds: 0,
            resend_at: None,
            resent_last: None,
            synced: false,
            events: VecDeque::new(),
            admission: setup.admission,
            crypto: setup.crypto,
            my_meta: Arc::new(setup.metadata),
            my_seq,
            my_record,
            my_incarnation: 0,
            left: false,
            meta_sent: false,
            renewed: None,
            refute: false,
            wall_ms: setup.wall_ms,
            wall_at: now,
            last_suspected: None,
            stall_counted: false,
            health: 0,
            next_pushpull: None,
            checks: HashMap::new(),
            heard: HashMap::new(),
            flapped: HashMap::new(),
            flapped_pruned: None,
            declares: Vec::new(),
            relayed_suspicions: Vec::new(),
            armed: HashSet::new(),
            timer_token: None,
            suspects: HashSet::new(),
            pings: HashMap::new(),
            notes: None,
            ctx: String::new(),
            stats: Stats::default(),
        };
        Ok(m)
    }

    /// Tells the core the wall clock (milliseconds since the Unix epoch) at `now`; the
    /// driver calls it before each input, so a clock that was stepped is followed.
    pub fn set_wall_clock(&mut self, wall_ms: u64, now: Instant) {
        self.wall_ms = wall_ms;
        self.wall_at = now;
    }

    /// Our estimate of the wall clock at `now`.
    fn wall_ms_at(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.wall_at).as_millis();
        self.wall_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    /// Our current identity (the bump changes when we rejoin).
    pub fn identity(&self) -> &Identity {
        self.foca.identity()
    }

    /// Our SWIM incarnation (rises with each suspicion we refute; 0 after a renewal).
    pub fn incarnation(&self) -> u16 {
        self.my_incarnation
    }

    /// Our metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.my_meta
    }

    /// Estimated heap bytes per part of this core (capacities times element sizes; hash
    /// maps with their empty buckets and control bytes). The simulation's `--mem`; foca's
    /// member list is estimated from its length (its `Vec` grows by doubling).
    #[doc(hidden)]
    pub fn memory(&self) -> Vec<(&'static str, usize)> {
        fn map<K, V>(m: &HashMap<K, V>) -> usize {
            map_bytes(m.capacity(), size_of::<(K, V)>())
        }
        fn set<K>(m: &HashSet<K>) -> usize {
            map_bytes(m.capacity(), size_of::<K>())
        }
        let sh = lock(&self.shared);
        let members = self.foca.iter_membership_state().len();
        vec![
            (
                "foca_members",
                members.next_power_of_two() * size_of::<Member<Identity>>(),
            ),
            ("peers", sh.peers.heap_bytes()),
            ("senders", map(&sh.senders)),
            (
                "pair_keys",
                // entry (key, directory key, tick, Vec) and one gossip key's two ciphers
                self.sealer.pairs_cached() * (size_of::<NodeId>() + 32 + 8 + 24 + 72 + 1),
            ),
            (
                "confirms",
                map(&sh.confirms) + sh.confirms.values().map(set).sum::<usize>(),
            ),
            ("heard", map(&self.heard)),
            ("flapped", map(&self.flapped)),
            (
                "queues",
                self.events.capacity() * size_of::<Event>()
                    + self.transmits.capacity() * size_of::<Transmit>(),
            ),
            ("suspects", set(&self.suspects)),
            ("record_queue", self.records.heap_bytes()),
            ("entries", self.entries.heap_bytes()),
            ("checks_pings", map(&self.checks) + map(&self.pings)),
            (
                "timers",
                self.timers.capacity() * size_of::<Pending>() + self.declares.capacity() * 40,
            ),
        ]
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.health = self.health;
        let c = lock(&self.shared).counts;
        s.dropped_not_admitted += c.not_admitted;
        s.items_bad_signature += c.bad_signature;
        s.items_unproven += c.unproven;
        s.entries_too_big += c.entries_too_big;
        s
    }

    /// Pending membership updates, and signed items (node records and witnesses) to spread.
    pub fn backlog(&self) -> (usize, usize) {
        (
            self.foca.updates_backlog(),
            self.foca.custom_broadcast_backlog() + self.records.len(),
        )
    }

    /// Number of members foca considers active (up or suspect), ourselves excluded.
    pub fn num_active(&self) -> usize {
        self.foca.num_members()
    }

    /// Every member known, down ones included, ourselves excluded.
    pub fn members(&self) -> Vec<MemberInfo> {
        let sh = lock(&self.shared);
        self.foca
            .iter_membership_state()
            .map(|m| MemberInfo {
                id: m.id().id,
                addr: m.id().socket_addr(),
                bump: m.id().bump,
                incarnation: m.incarnation(),
                state: match m.state() {
                    State::Alive => MemberState::Up,
                    State::Suspect => MemberState::Suspect,
                    State::Down => MemberState::Down,
                },
                metadata: sh.peers.record(&m.id().id).map(|r| r.meta.clone()),
            })
            .collect()
    }

    /// Asks the nodes at `seeds` (node ID and gossip address: the control plane knows both)
    /// to let us in (UDP announce), and queues a push-pull with each (full state at join).
    pub fn join(&mut self, seeds: &[(NodeId, SocketAddr)], now: Instant) {
        // Our first record goes out at our first contact (see `absorb`), straight to a few
        // members rather than behind the backlog of updates a join brings.
        let me = self.foca.identity().id;
        for &(id, addr) in seeds {
            if id == me || id == NodeId::ANY {
                continue;
            }
            // Bump 0: foca accepts an announce addressed to any identity of the right node.
            let seed = Identity::new(id, addr, 0);
            let mut rt = Collect::default();
            if self.foca.announce(seed, &mut rt).is_err() {
                self.stats.dropped_protocol += 1;
            }
            self.absorb(rt, now);
            self.queue_pushpull(Peer { id, addr });
        }
    }

    /// Leaves the cluster on purpose: others report [`Event::Left`]. After this the core
    /// only answers; drop it once [`Membership::poll_transmit`] is drained.
    pub fn leave(&mut self, now: Instant) -> Result<(), ApiError> {
        self.left = true;
        // The signed leaving record goes first, on its own, so it arrives before our Down.
        self.publish(now);
        let mut rt = Collect::default();
        self.foca
            .leave_cluster(&mut rt)
            .map_err(|e| ApiError::Protocol(e.to_string()))?;
        self.absorb(rt, now);
        Ok(())
    }

    /// Changes our metadata (role change, new VTEP, new data-path incarnation) and spreads
    /// it. Its public key must stay our own.
    pub fn update_metadata(&mut self, meta: Metadata, now: Instant) -> Result<(), ApiError> {
        meta.validate()?;
        if meta.public_key != self.crypto.public().x25519 {
            return Err(ApiError::KeyMismatch);
        }
        self.my_meta = Arc::new(meta);
        self.publish(now);
        Ok(())
    }

    /// Sets our entry `key` to `value` at `version` (`None` deletes it: a tombstone that
    /// replaces it everywhere), reports it as an [`Event::Entry`], and spreads it at once
    /// (a gossip round to a few members within [`EAGER_SPACING`], then relayed by every
    /// node that hears it). `version` must be higher than the one held for `key`, ours from
    /// this run or from an earlier run learnt from others ([`ApiError::StaleVersion`]), and
    /// must never go back across restarts: a wall-clock-millisecond or stored counter. A
    /// refused call changes nothing.
    pub fn set_entry(
        &mut self,
        key: Vec<u8>,
        version: u64,
        value: Option<Vec<u8>>,
        now: Instant,
    ) -> Result<(), ApiError> {
        if self.left {
            return Err(ApiError::Left);
        }
        Entry::check(&key, value.as_deref())?;
        let me = self.foca.identity().id;
        match self.entries.get(&me, &key) {
            Some(held) if version <= held.version => {
                return Err(ApiError::StaleVersion {
                    version,
                    held: held.version,
                })
            }
            Some(_) => {}
            None => {
                let max = self.config.max_entries_per_author;
                if self.entries.author_len(&me) >= max {
                    return Err(ApiError::TooManyEntries(max));
                }
            }
        }
        let e = Arc::new(Entry::signed(
            me,
            key,
            version,
            value,
            self.crypto.as_ref(),
        )?);
        self.entries.insert(
            Arc::clone(&e),
            now,
            self.config.tombstone_ttl,
            self.config.entries_down_grace,
        );
        self.entry_event(&e);
        self.queue_entry(&e);
        self.eager_rounds = EAGER_ROUNDS;
        self.eager(now);
        Ok(())
    }

    /// Every live entry held (tombstones left out), ours included, in (author, key) order.
    pub fn entries(&self) -> Vec<EntryInfo> {
        self.entries
            .iter()
            .filter_map(|e| {
                e.value.as_ref().map(|v| EntryInfo {
                    author: e.author,
                    key: e.key.clone(),
                    version: e.version,
                    value: v.clone(),
                })
            })
            .collect()
    }

    /// Replaces the gossip keys.
    pub fn set_keys(&mut self, keyring: Keyring) {
        self.sealer.set_keys(keyring);
    }

    /// Replaces the directory. Members no longer in it are declared down (and the news
    /// spread); what was accepted under keys that changed (signed records, cached pair keys)
    /// is forgotten.
    pub fn set_admission(&mut self, admission: Admission, now: Instant) {
        let removed: Vec<Identity> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != State::Down && !admission.admits(&m.id().id))
            .map(|m| *m.id())
            .collect();
        let old = std::mem::replace(&mut self.admission, admission.clone());
        {
            let mut sh = lock(&self.shared);
            sh.peers.retain_records(|id| {
                admission.keys(id).is_some() && admission.keys(id) == old.keys(id)
            });
            sh.senders.retain(|id, _| admission.admits(id));
            sh.admission = admission.clone();
        }
        self.sealer.set_directory(&admission);
        self.records.retain(|id| admission.admits(id));
        // Entries of members removed, or accepted under keys that changed, go now.
        let me = self.foca.identity().id;
        let dropped = self.entries.retain_authors(|id| {
            *id == me || (admission.keys(id).is_some() && admission.keys(id) == old.keys(id))
        });
        self.entries_dropped(dropped);
        if !removed.is_empty() {
            let mut rt = Collect::default();
            if self
                .foca
                .apply_many(removed.into_iter().map(Member::down), true, &mut rt)
                .is_err()
            {
                self.stats.dropped_protocol += 1;
            }
            self.absorb(rt, now);
        }
    }

    /// The next time [`Membership::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = self
            .checks
            .values()
            .map(|c| {
                if c.sends_left > 0 {
                    c.next_send
                } else {
                    c.deadline
                }
            })
            .min();
        let d = self.declares.iter().map(|d| d.0).min();
        let c = match (c, d) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let t = match (self.timers.peek().map(|p| p.deadline), c) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        [
            self.next_pushpull,
            self.eager_at,
            self.resend_at,
            self.entries.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .chain(t)
        .min()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Queues a push-pull exchange with `peer`, unless one is queued already (a join and the
    /// member coming up would otherwise open two connections to it at once).
    fn queue_pushpull(&mut self, peer: Peer) {
        if !self.pushpulls.contains(&peer) {
            self.pushpulls.push_back(peer);
        }
    }

    /// The next peer to run a push-pull exchange with (over TCP, see
    /// [`Membership::pushpull_frame`]).
    pub fn poll_pushpull(&mut self) -> Option<Peer> {
        self.pushpulls.pop_front()
    }

    /// The next membership event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front();
        if e.is_none() && self.events.capacity() > 256 {
            // A restore or a push-pull queues an event per member; once drained, give the
            // space back (a simulation holds thousands of cores at once).
            self.events.shrink_to(16);
        }
        e
    }

    /// Handles one received datagram. Errors are already counted; the caller may log them.
    pub fn handle_datagram(&mut self, data: &[u8], now: Instant) -> Result<(), RecvError> {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += data.len() as u64;
        if data.len() > MAX_DATAGRAM {
            self.stats.dropped_oversize += 1;
            return Err(RecvError::Oversize(data.len()));
        }
        let opened =
            match self
                .sealer
                .open(Kind::Datagram, data, &self.admission, self.crypto.as_ref())
            {
                Ok(o) => o,
                Err(e) => {
                    match e {
                        OpenError::UnknownSender => self.stats.dropped_not_admitted += 1,
                        _ => self.stats.dropped_seal += 1,
                    }
                    return Err(e.into());
                }
            };
        self.stats.datagrams_opened += 1;
        let plain = match self.screen(&opened, now) {
            Ok(p) => p,
            Err(e) => {
                match e {
                    RecvError::Spoofed { .. } => self.stats.dropped_spoofed += 1,
                    RecvError::FutureEpoch { .. } => self.stats.dropped_future += 1,
                    RecvError::RenewalHeld(_) => self.stats.dropped_renewal += 1,
                    RecvError::Replay(_) => self.stats.dropped_replay += 1,
                    _ => self.stats.dropped_decode += 1,
                }
                return Err(e);
            }
        };
        let plain: &[u8] = plain.as_deref().unwrap_or(opened.plaintext());
        if let Ok((h, _)) = codec::decode_header(plain) {
            if let Message::Ack(probe) = h.message {
                self.probe_answered(h.src.id, probe, now);
            }
        }
        let mut rt = Collect::default();
        if self.notes.is_some() {
            self.ctx = match codec::decode_header(plain) {
                Ok((h, _)) => format!("{:?} from {} bump {}", h.message, h.src.id, h.src.bump),
                Err(_) => "bad datagram".into(),
            };
        }
        let res = self.foca.handle_data(plain, &mut rt);
        self.absorb(rt, now);
        self.arm_suspicions(now);
        if std::mem::take(&mut self.refute) {
            self.refute_now(now);
            // Someone holds us down: it may have dropped our entries (or will, after the
            // grace), and its side of a split never heard those we set meanwhile.
            self.resend_own(now);
        }
        // Entries last: the records in the datagram may just have taken their author back
        // up, and they are welcome again.
        let entries = std::mem::take(&mut lock(&self.shared).entries_in);
        if !entries.is_empty() {
            self.take_entries(entries, true, 0, now);
        }
        self.take_unparked(now);
        match res {
            Ok(()) => Ok(()),
            Err(foca::Error::Decode(e)) | Err(foca::Error::CustomBroadcast(e)) => {
                self.stats.dropped_decode += 1;
                Err(RecvError::Protocol(e.to_string()))
            }
            Err(e) => {
                self.stats.dropped_protocol += 1;
                Err(RecvError::Protocol(e.to_string()))
            }
        }
    }

    /// Checks an opened datagram before foca sees it: the header must name the sender that
    /// sealed it, its epoch must be plausible, it must not be a replay, a "you are down" must
    /// not come too soon after our last renewal, and every member record in it must be within
    /// what its subject stated (see the module docs). Returns the rewritten plaintext, or
    /// `None` to hand foca the datagram as it came.
    fn screen(&mut self, opened: &Opened, now: Instant) -> Result<Option<Vec<u8>>, RecvError> {
        let plain = opened.plaintext();
        let sender = opened.sender();
        let (header, hlen) = codec::decode_header(plain)?;
        if header.src.id != sender {
            return Err(RecvError::Spoofed {
                claimed: header.src.id,
                sender,
            });
        }
        let seq = opened.sequence();
        let wall = self.wall_ms_at(now);
        let bound = u64::try_from(MAX_EPOCH_AHEAD.as_millis()).unwrap_or(u64::MAX);
        if seq.epoch > wall.saturating_add(bound) {
            return Err(RecvError::FutureEpoch {
                sender,
                ahead_s: (seq.epoch - wall) / 1000,
            });
        }
        let me = *self.foca.identity();
        let turn_undead = header.message == Message::TurnUndead && header.dst == me;
        if turn_undead
            && self
                .renewed
                .is_some_and(|t| now.saturating_duration_since(t) < RENEW_HOLD)
        {
            return Err(RecvError::RenewalHeld(sender));
        }
        self.check_sender(sender, seq, header.src, header.src_incarnation)?;
        if turn_undead {
            // "You are down": we refute (a higher incarnation, in a new signed record that
            // takes us back up wherever we are held down) instead of letting foca renew our
            // identity. foca sees an empty gossip from the sender.
            self.renewed = Some(now);
            self.refute = true;
            let mut h = header;
            h.message = Message::Gossip;
            return Ok(Some(codec::encode_header(&h)));
        }
        if !self.checks.is_empty() {
            self.checks.remove(&sender);
        }
        let broadcast = header.message == Message::Broadcast;
        self.take_records_from_down_sender(sender, &plain[hlen..], broadcast, now);
        let mut r = Reader::new(&plain[hlen..]);
        if r.remaining() < 2 || header.message == Message::Broadcast {
            return Ok(None);
        }
        let n = r.u16()?;
        let mut updates: Vec<Member<Identity>> = Vec::with_capacity(usize::from(n));
        let mut rewrite = false;
        let mut downed: Vec<(Identity, u16)> = Vec::new();
        {
            let sh = lock(&self.shared);
            for _ in 0..n {
                let m = codec::get_member(&mut r)?;
                match screen_member(&sh, m, Some(sender), &me) {
                    Screened::Keep(m) => updates.push(m),
                    Screened::Rewritten(m) => {
                        self.stats.records_rewritten += 1;
                        rewrite = true;
                        if m.id().id != me.id {
                            downed.push((*m.id(), m.incarnation()));
                        }
                        updates.push(m);
                    }
                    Screened::NotAdmitted => {
                        self.stats.dropped_not_admitted += 1;
                        rewrite = true;
                    }
                    Screened::Unproven => {
                        self.stats.records_dropped += 1;
                        rewrite = true;
                    }
                }
            }
        }
        for (member, inc) in downed {
            self.relayed_down(member, inc, now);
        }
        for m in &updates {
            if m.id().id != me.id && m.state() == State::Suspect {
                self.relayed_suspicions.push((*m.id(), m.incarnation()));
            }
            if m.id() == &me
                && m.state() == State::Suspect
                && self.config.local_health
                && self.last_suspected != Some(m.incarnation())
            {
                // Once per suspected incarnation, not once per copy of the rumour.
                self.last_suspected = Some(m.incarnation());
                self.health = (self.health + 1).min(self.config.max_health);
            }
        }
        if !rewrite {
            return Ok(None);
        }
        let tail = r.rest();
        let mut out = Vec::with_capacity(plain.len());
        out.extend_from_slice(&plain[..hlen]);
        out.extend_from_slice(&(updates.len() as u16).to_be_bytes());
        for m in &updates {
            codec_put_member(&mut out, m);
        }
        out.extend_from_slice(tail);
        Ok(Some(out))
    }

    /// Accepts `seq` from the authenticated `sender` once, and notes what its header states
    /// of itself. Windows are kept for every node foca knows (down ones included, until foca
    /// forgets them) so a down run's datagrams stay refused; the map is bounded by the
    /// directory (only members authenticate) and pruned to what foca knows.
    fn check_sender(
        &mut self,
        sender: NodeId,
        seq: Sequence,
        identity: Identity,
        incarnation: u16,
    ) -> Result<(), ReplayError> {
        let known = self.foca.iter_membership_state().len();
        let mut sh = lock(&self.shared);
        if let Some(s) = sh.senders.get_mut(&sender) {
            s.window.check(seq)?;
            if later((identity, incarnation), (s.identity, s.incarnation)) {
                s.identity = identity;
                s.incarnation = incarnation;
                drop(sh);
                self.records.refuted(sender, identity.bump, incarnation);
            }
            return Ok(());
        }
        if sh.senders.len() > 2 * known + 64 {
            // Forget the senders foca no longer knows (bounded, amortized).
            let ids: HashSet<NodeId> = self
                .foca
                .iter_membership_state()
                .map(|m| m.id().id)
                .collect();
            sh.senders.retain(|id, _| ids.contains(id));
        }
        sh.senders.insert(
            sender,
            Sender {
                window: ReplayWindow::new(seq),
                identity,
                incarnation,
            },
        );
        Ok(())
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.prune_flapped(now);
        if let Some(at) = self.next_pushpull {
            if at <= now {
                self.schedule_pushpull(now);
                if let Some(peer) = self.pick_pushpull_peer() {
                    self.queue_pushpull(peer);
                }
            }
        }
        while let Some(top) = self.timers.peek() {
            if top.deadline > now {
                break;
            }
            let Some(p) = self.timers.pop() else { break };
            self.fire(p, now);
        }
        self.stall_counted = false;
        self.run_checks(now);
        if self.declares.iter().any(|d| d.0 <= now) {
            self.run_declares(now);
        }
        if self.eager_at.is_some_and(|t| t <= now) {
            self.eager(now);
        }
        if self.resend_at.is_some_and(|t| t <= now) {
            match self
                .resent_last
                .map(|t| t + RESEND_HOLD)
                .filter(|t| *t > now)
            {
                Some(later) => self.resend_at = Some(later),
                None => {
                    self.resend_at = None;
                    self.resent_last = Some(now);
                    self.rebroadcast_own(now);
                }
            }
        }
        if self.entries.next_deadline().is_some_and(|t| t <= now) {
            let dropped = self.entries.expire(now, self.config.entries_down_grace);
            self.entries_dropped(dropped);
        }
        self.take_unparked(now);
    }

    /// Reports a change of what we hold for (author, key).
    fn entry_event(&mut self, e: &Entry) {
        self.events.push_back(Event::Entry {
            author: e.author,
            key: e.key.clone(),
            version: e.version,
            value: e.value.clone(),
        });
    }

    /// Reports live entries dropped with their author, and stops spreading that author's.
    fn entries_dropped(&mut self, dropped: Vec<Arc<Entry>>) {
        let mut last = None;
        for e in dropped {
            if last != Some(e.author) {
                last = Some(e.author);
                self.records.drop_entries_of(&e.author);
            }
            self.stats.entries_dropped += 1;
            self.events.push_back(Event::Entry {
                author: e.author,
                key: e.key.clone(),
                version: e.version,
                value: None,
            });
        }
    }

    /// Queues an entry for `max_transmissions + num_indirect_probes` sends: the rounds after
    /// the eager ones keep the budget a record has (the second eager round would otherwise
    /// spend most of it at once, and a node all of them missed would wait for a
    /// push-pull).
    fn queue_entry(&mut self, e: &Arc<Entry>) {
        let tx = usize::from(self.config.swim.max_transmissions.get())
            + self.config.swim.num_indirect_probes.get();
        if self.records.push_entry(e, tx) {
            self.stats.entries_queue_evicted += 1;
        }
    }

    /// Takes entries received from others: the cheap checks first (author admitted, newer
    /// than what we hold, author not gone, room under the limit), then the signature under
    /// the author's directory key. Each one taken is reported. Those heard in a datagram
    /// (`datagram`) are also spread on, at once; of those from a push-pull state or a
    /// restore, the first `spread` (a node that missed a change is seldom alone: after a
    /// healed split, a whole side did). An entry refused because its author is gone is
    /// parked (verified) in case the author comes back up meanwhile.
    fn take_entries(&mut self, list: Vec<Arc<Entry>>, datagram: bool, spread: usize, now: Instant) {
        self.stats.entries_received += list.len() as u64;
        let list = list.into_iter().map(|e| (datagram, e)).collect();
        self.take_checked(list, spread, now);
    }

    /// Takes the parked entries whose author came back up (see [`Table::park`]).
    fn take_unparked(&mut self, now: Instant) {
        let back = self.entries.take_unparked();
        if !back.is_empty() {
            let spread = if self.synced { MAX_STATE_RELAY } else { 0 };
            self.take_checked(back, spread, now);
        }
    }

    /// [`Membership::take_entries`], each entry saying whether it came in a datagram.
    fn take_checked(&mut self, list: Vec<(bool, Arc<Entry>)>, mut spread: usize, now: Instant) {
        let mut fresh = false;
        for (datagram, e) in list {
            let Some(keys) = self.admission.keys(&e.author).copied() else {
                self.stats.dropped_not_admitted += 1;
                continue;
            };
            match self.entries.check(
                &e,
                self.config.max_entries_per_author,
                self.config.entries_down_grace,
                now,
            ) {
                Ok(()) => {}
                Err(Refused::Stale) => {
                    self.stats.entries_stale += 1;
                    continue;
                }
                Err(Refused::OverLimit) => {
                    self.stats.entries_over_limit += 1;
                    continue;
                }
                Err(Refused::Gone) => {
                    self.stats.entries_refused_gone += 1;
                    if !self.entries.is_parked(&e) && e.verify(&keys.ed25519, self.crypto.as_ref())
                    {
                        self.entries.park(e, datagram, now);
                    }
                    continue;
                }
            }
            if !e.verify(&keys.ed25519, self.crypto.as_ref()) {
                self.stats.entries_bad_signature += 1;
                continue;
            }
            self.stats.entries_applied += 1;
            let relay = datagram || spread > 0;
            if !datagram {
                self.stats.entries_from_pushpull += 1;
                spread = spread.saturating_sub(1);
            }
            self.entries.insert(
                Arc::clone(&e),
                now,
                self.config.tombstone_ttl,
                self.config.entries_down_grace,
            );
            self.entry_event(&e);
            if relay {
                self.queue_entry(&e);
                fresh = true;
            }
        }
        if fresh {
            self.eager_rounds = EAGER_ROUNDS;
            self.eager(now);
        }
    }

    /// Gossips at once (to `num_indirect_probes` members) what the queue holds, for the
    /// eager rounds left ([`EAGER_ROUNDS`]), at most once per [`EAGER_SPACING`]; calls within
    /// it share the round that follows.
    fn eager(&mut self, now: Instant) {
        if self.eager_rounds == 0 || self.foca.num_members() == 0 || self.records.is_empty() {
            // Nothing to send, or nobody to tell yet (the queue goes out with our first
            // datagrams).
            self.eager_at = None;
            self.eager_rounds = 0;
            return;
        }
        if let Some(next) = self.eager_last.map(|t| t + EAGER_SPACING) {
            if now < next {
                self.eager_at = Some(next);
                return;
            }
        }
        self.eager_rounds -= 1;
        self.eager_at = (self.eager_rounds > 0).then(|| now + EAGER_SPACING);
        self.eager_last = Some(now);
        let mut rt = Collect::default();
        if self.foca.gossip(&mut rt).is_err() {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
    }

    /// Sends our own entries again at the next timeout, or once [`RESEND_HOLD`] has passed
    /// since the last time: others may have dropped them (we were declared down: a member
    /// told us, or our identity changed). (After a healed split, the push-pulls that
    /// reconnect the sides carry them, and whoever they are new to spreads them on.)
    fn resend_own(&mut self, now: Instant) {
        let me = self.foca.identity().id;
        if self.entries.of(&me).next().is_some() {
            self.resend_at = Some(self.resend_at.map_or(now, |t| t.min(now)));
        }
    }

    /// Spreads our own entries again (tombstones included), at once, each for
    /// `max_transmissions` sends again.
    fn rebroadcast_own(&mut self, now: Instant) {
        let me = self.foca.identity().id;
        let own: Vec<Arc<Entry>> = self.entries.of(&me).cloned().collect();
        if own.is_empty() {
            return;
        }
        for e in &own {
            self.queue_entry(e);
        }
        self.eager_rounds = EAGER_ROUNDS;
        self.eager(now);
    }

    /// Confirmation probes: re-send, or declare ourselves an independent witness.
    fn run_checks(&mut self, now: Instant) {
        if self.checks.is_empty() {
            return;
        }
        let mut due: Vec<NodeId> = self
            .checks
            .iter()
            .filter(|(_, c)| (c.sends_left > 0 && c.next_send <= now) || c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort();
        let me = self.foca.identity().id;
        for id in due {
            let Some(mut c) = self.checks.remove(&id) else {
                continue;
            };
            if c.deadline <= now {
                if self.config.local_health
                    && now.saturating_duration_since(c.deadline) > Duration::from_millis(250)
                {
                    // We were stalled: the answers may be sitting unread in our queue.
                    continue;
                }
                // Silent through four announces: we are an independent witness.
                if self.witnesses(&c.subject, c.incarnation) < QUORUM {
                    let item = self.witness_item(c.subject, c.incarnation);
                    let tx = self.config.swim.max_transmissions.get().into();
                    self.records.push_witness(&item, tx);
                }
                lock(&self.shared).witness(c.subject, c.incarnation, me, me);
                if c.declare {
                    self.declare_down(c.subject, c.incarnation, now, "silent to our check");
                }
                continue;
            }
            c.sends_left -= 1;
            c.next_send = now + Duration::from_millis(200);
            let mut rt = Collect::default();
            let _ = self.foca.announce(c.subject, &mut rt);
            self.absorb(rt, now);
            self.checks.insert(id, c);
        }
    }

    /// Checks a suspect ourselves (four announces 200 ms apart) and declares it down if it
    /// stays silent for 900 ms; see [`Check::declare`].
    fn check_then_declare(&mut self, subject: Identity, incarnation: u16, now: Instant) {
        match self.checks.get_mut(&subject.id) {
            Some(c) if c.subject == subject && c.incarnation == incarnation => c.declare = true,
            _ => {
                self.checks.insert(
                    subject.id,
                    Check {
                        subject,
                        incarnation,
                        sends_left: 4,
                        next_send: now,
                        deadline: now + Duration::from_millis(900),
                        declare: true,
                    },
                );
            }
        }
        self.suspects.insert(subject.id);
        self.run_checks(now);
    }

    /// Declares `subject` down at `incarnation`, if foca still holds it there (up or
    /// suspect), and spreads the news.
    fn declare_down(&mut self, subject: Identity, incarnation: u16, now: Instant, why: &str) {
        let held = self
            .foca
            .iter_members()
            .any(|m| m.id() == &subject && m.incarnation() == incarnation);
        if !held {
            return;
        }
        if let Some(n) = self.notes.as_mut() {
            n.push(format!("declare {} inc {incarnation}: {why}", subject.id));
        }
        let mut rt = Collect::default();
        if self
            .foca
            .apply_many(
                std::iter::once(Member::new(subject, incarnation, State::Down)),
                true,
                &mut rt,
            )
            .is_err()
        {
            self.stats.dropped_protocol += 1;
        } else {
            self.stats.declared_down += 1;
        }
        self.absorb(rt, now);
    }

    /// Starts confirmation probes for suspicions we just heard of.
    fn start_checks(&mut self, now: Instant) {
        let fresh: Vec<(Identity, u16)> = std::mem::take(&mut lock(&self.shared).fresh_suspects);
        if self.heard.len() > 8192 {
            self.heard.clear();
        }
        if self.suspects.len() > 4096 {
            self.suspects.clear();
        }
        for (subject, inc) in &fresh {
            self.heard
                .entry((subject.id, subject.bump, *inc))
                .or_insert(now);
            self.suspects.insert(subject.id);
            if self.damped(subject, *inc, now) {
                // Each suspicion of a damped member starts the period again.
                if let Some(f) = self.flapped.get_mut(&subject.id) {
                    f.at = now;
                }
            }
        }
        if fresh.is_empty() || self.config.confirm_probes == 0 || !self.config.dynamic_suspicion {
            return;
        }
        // A node that knows it is slow does not trust its own silence observations.
        if self.config.local_health && self.health > 0 {
            return;
        }
        let n = self.foca.num_members().max(1) as f64;
        let q = (f64::from(self.config.confirm_probes) / n).min(1.0);
        for (subject, incarnation) in fresh {
            if self.checks.contains_key(&subject.id) || self.rng.random::<f64>() >= q {
                continue;
            }
            self.checks.insert(
                subject.id,
                Check {
                    subject,
                    incarnation,
                    sends_left: 4,
                    next_send: now,
                    deadline: now + Duration::from_millis(900),
                    declare: false,
                },
            );
        }
        self.run_checks(now);
    }

    fn multiplier(&self) -> u32 {
        if self.config.local_health {
            1 + self.health
        } else {
            1
        }
    }

    fn fire(&mut self, mut p: Pending, now: Instant) {
        let period = self.config.swim.probe_period;
        let late = now.saturating_duration_since(p.deadline);
        let late_us = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        self.stats.timers_fired += 1;
        self.stats.timer_late_sum_us = self.stats.timer_late_sum_us.saturating_add(late_us);
        self.stats.timer_late_max_us = self.stats.timer_late_max_us.max(late_us);
        let stalled = self.config.local_health && late > period / 2;
        if stalled && !self.stall_counted {
            // One point per stall, however many timers it delayed.
            self.stall_counted = true;
            self.health = (self.health + 1).min(self.config.max_health);
        }
        if let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &p.timer
        {
            // A suspicion someone else raised waits the whole suspicion_max here: the
            // witnesses that shorten it only count through the quorum rule, as before
            // relayed Downs became suspicions (the prober's own timer, stretched by its
            // local health, was what declared; a slow prober must not make every healthy
            // node declare at the minimum).
            let timeout = if p.relayed {
                self.config.suspicion_max * self.multiplier()
            } else {
                self.suspicion_timeout(member_id, *incarnation, p.created)
            };
            let due = p.created + timeout;
            if due > now {
                p.deadline = due;
                self.push_pending(p);
                return;
            }
            if stalled && !p.deferred {
                p.deferred = true;
                p.deadline = now + period;
                self.push_pending(p);
                return;
            }
            // foca 2.0 sends its courtesy TurnUndead whenever the member still exists, even
            // when the suspicion was refuted meanwhile (its incarnation moved on) and nothing
            // is declared down: the healthy member then believes it was declared down and
            // renews its identity, and everyone sees its old identity go down. So the timer
            // only reaches foca while the suspicion it was armed for still stands.
            let stands = self.foca.iter_members().any(|m| {
                m.id() == member_id
                    && m.incarnation() == *incarnation
                    && m.state() == State::Suspect
            });
            if !stands {
                return;
            }
            if p.relayed && self.config.dynamic_suspicion {
                // Someone else's suspicion, unrefuted here after suspicion_max. We may have
                // missed the refutation (its record reaches every node but one now and
                // then): ask the suspect ourselves before declaring. A node that knows it is
                // slow does not trust its own silence observations, and waits again.
                let (member, inc) = (*member_id, *incarnation);
                if self.config.local_health && self.health > 0 {
                    p.created = now;
                    p.deadline = now + self.config.suspicion_max * self.multiplier();
                    self.push_pending(p);
                } else {
                    self.check_then_declare(member, inc, now);
                }
                return;
            }
        }
        let is_probe = matches!(p.timer, Timer::ProbeRandomMember(_));
        let is_down = matches!(p.timer, Timer::ChangeSuspectToDown { .. });
        let note = match (&p.timer, self.notes.is_some()) {
            (
                Timer::ChangeSuspectToDown {
                    member_id,
                    incarnation,
                    ..
                },
                true,
            ) => Some(format!(
                "timer {} inc {} after {:.2}s (late {:.2}s) witnesses {} health {}",
                member_id.id,
                incarnation,
                now.saturating_duration_since(p.created).as_secs_f64(),
                late.as_secs_f64(),
                self.witnesses(member_id, *incarnation),
                self.health
            )),
            _ => None,
        };
        let before = self.stats.probes_failed;
        let active_before = self.foca.num_members();
        if self.notes.is_some() {
            self.ctx = format!("timer {:?}", p.timer);
        }
        let is_gossip = matches!(p.timer, Timer::PeriodicGossip(_));
        let mut rt = Collect::default();
        if self.foca.handle_timer(p.timer, &mut rt).is_err() {
            self.stats.dropped_protocol += 1;
        }
        if is_gossip
            && !self.records.is_empty()
            && self.foca.updates_backlog() == 0
            && self.foca.custom_broadcast_backlog() == 0
            && self.foca.num_members() > 0
        {
            // foca gossips only while its own queues hold something; our records are kept
            // apart (see `RecordQueue`), so they ask for the gossip round themselves. Each
            // datagram spends one of a record's transmissions: the bytes are those of a
            // round foca would have made.
            if self.foca.gossip(&mut rt).is_err() {
                self.stats.dropped_protocol += 1;
            }
        }
        self.absorb(rt, now);
        if is_probe && self.stats.probes_failed == before && self.config.local_health {
            self.health = self.health.saturating_sub(1);
        }
        if is_down && self.foca.num_members() < active_before {
            self.stats.declared_down += 1;
            if let (Some(n), Some(notes)) = (note, self.notes.as_mut()) {
                notes.push(n);
            }
        }
    }

    /// Notes a direct probe sent, for [`Stats::probe_rtt_count`]. Kept bounded: probes go
    /// out about once a period, and those unanswered for 10 s are forgotten.
    fn probe_sent(&mut self, to: NodeId, probe: u8, now: Instant) {
        if self.pings.len() >= 64 {
            self.pings
                .retain(|_, sent| now.saturating_duration_since(*sent) < Duration::from_secs(10));
        }
        if self.pings.len() < 64 {
            self.pings.insert((to, probe), now);
        }
    }

    /// An acknowledgement of a direct probe: one round-trip sample.
    fn probe_answered(&mut self, from: NodeId, probe: u8, now: Instant) {
        if let Some(sent) = self.pings.remove(&(from, probe)) {
            let us =
                u64::try_from(now.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
            self.stats.probe_rtt_count += 1;
            self.stats.probe_rtt_sum_us = self.stats.probe_rtt_sum_us.saturating_add(us);
            self.stats.probe_rtt_last_us = us;
        }
    }

    fn witnesses(&self, member: &Identity, incarnation: u16) -> usize {
        lock(&self.shared)
            .confirms
            .get(&(member.id, member.bump, incarnation))
            .map_or(0, HashSet::len)
    }

    /// Turns debug notes on (declarations of members down, with why); simulation only.
    #[doc(hidden)]
    pub fn set_debug(&mut self, on: bool) {
        self.notes = on.then(Vec::new);
    }

    /// Takes the debug notes gathered since the last call.
    #[doc(hidden)]
    pub fn take_notes(&mut self) -> Vec<String> {
        self.notes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether the witnesses of this suspicion (member, incarnation) were first heard more
    /// than `suspicion_max` (stretched by local health) before `at`. A suspicion lives at
    /// most that long, so they belong to an earlier episode: one that was declared, refuted,
    /// or never reached its subject. As Lifeguard counts confirmations only while their
    /// suspicion runs, such witnesses neither shorten a later suspicion's timeout nor make a
    /// quorum. (At N = 500 with slow readers, witnesses heard 77 s apart at the same bump and
    /// incarnation made a quorum and declared a healthy member down at once.)
    fn witnesses_stale(&self, member: &Identity, incarnation: u16, at: Instant) -> bool {
        let window = self.config.suspicion_max * self.multiplier();
        self.heard
            .get(&(member.id, member.bump, incarnation))
            .is_some_and(|h| at.saturating_duration_since(*h) > window)
    }

    /// Whether `id` is under flap damping at `at`: seen down (or suspected while damped)
    /// less than `flap_damping` before, and not as one of many. When three or more members,
    /// and a tenth or more of them, went down within that time (a partition and its heal,
    /// not a host that pauses), nobody is damped: the fast path is what brings the two sides
    /// back together (with damping there, the N = 1000 partition heal p99 went from 22.75 to
    /// 32.75 s).
    fn damped(&self, member: &Identity, incarnation: u16, at: Instant) -> bool {
        let recent = self.flapped.values().filter(|f| f.counted).count();
        let many = recent >= 3 && recent * 10 >= self.foca.num_members().max(1);
        self.config.flap_damping.is_some_and(|window| {
            !many
                && self.flapped.get(&member.id).is_some_and(|f| {
                    at.saturating_duration_since(f.at) <= window
                        && later((*member, incarnation), f.down)
                })
        })
    }

    /// Flap damping: records that `member` went down at `incarnation`, at `now` (seen by us,
    /// or declared by someone whose `Down` reached us).
    fn flapped(&mut self, member: Identity, incarnation: u16, now: Instant) {
        self.flapped_as(member, incarnation, now, true);
    }

    /// [`Self::flapped`], saying whether it counts as a down for the many-downs rule. A
    /// quorum alone (`counted` false) only starts damping a member not damped yet: it must
    /// not move the marker of one that is, or the suspicion it damps would no longer be.
    fn flapped_as(&mut self, member: Identity, incarnation: u16, now: Instant, counted: bool) {
        if !counted && self.flapped.contains_key(&member.id) {
            return;
        }
        if self.config.flap_damping.is_some() {
            self.prune_flapped(now);
            if self.flapped.len() > 8192 {
                // More downs within one period than any cluster we size for: a mass event,
                // during which damping is off anyway.
                self.flapped.clear();
            }
            let (down, was) = match self.flapped.get(&member.id) {
                Some(f) if later(f.down, (member, incarnation)) => (f.down, f.counted),
                Some(f) => ((member, incarnation), f.counted),
                None => ((member, incarnation), false),
            };
            self.flapped.insert(
                member.id,
                Flapped {
                    at: now,
                    down,
                    counted: counted || was,
                },
            );
        }
    }

    /// Drops flap-damping entries older than the window, at most once a second, so the
    /// map's size is (to within that second) the count of recent downs, and of suspicions of
    /// damped members, that [`Self::damped`] reads.
    fn prune_flapped(&mut self, now: Instant) {
        let Some(window) = self.config.flap_damping else {
            return;
        };
        if self.flapped.is_empty()
            || self
                .flapped_pruned
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.flapped_pruned = Some(now);
        self.flapped
            .retain(|_, f| now.saturating_duration_since(f.at) <= window);
    }

    fn suspicion_timeout(&self, member: &Identity, incarnation: u16, created: Instant) -> Duration {
        // Plain SWIM has one fixed timeout, whoever else suspects the member; stale
        // witnesses count for nothing.
        if !self.config.dynamic_suspicion
            || self.witnesses_stale(member, incarnation, created)
            || self.damped(member, incarnation, created)
        {
            return self.config.suspicion_max * self.multiplier();
        }
        let c = lock(&self.shared)
            .confirms
            .get(&(member.id, member.bump, incarnation))
            .map(|s| s.iter().filter(|f| **f != self.foca.identity().id).count())
            .unwrap_or(0) as f64;
        let (min, max) = (
            self.config.suspicion_min.as_secs_f64(),
            self.config.suspicion_max.as_secs_f64(),
        );
        let k = f64::from(self.config.suspicion_k.max(1));
        let t = (max - (max - min) * (c + 1.0).ln() / (k + 1.0).ln()).max(min);
        Duration::from_secs_f64(t) * self.multiplier()
    }

    fn push_pending(&mut self, p: Pending) {
        self.timers.push(p);
    }

    fn schedule_pushpull(&mut self, now: Instant) {
        let f: f64 = self.rng.random_range(0.5..1.5);
        self.next_pushpull = Some(now + self.config.pushpull_interval.mul_f64(f));
    }

    /// A random known member, down ones included (that is what heals partitions).
    fn pick_pushpull_peer(&mut self) -> Option<Peer> {
        let n = self.foca.iter_membership_state().len();
        if n == 0 {
            return None;
        }
        let i = self.rng.random_range(0..n);
        self.foca.iter_membership_state().nth(i).map(|m| Peer {
            id: m.id().id,
            addr: m.id().socket_addr(),
        })
    }

    /// Signs and spreads a new record of ourselves (identity, incarnation, metadata,
    /// leaving), at once to a few members and then with the other records
    /// ([`RecordQueue`]). Members learn a new identity or incarnation of ours only from this
    /// record (or from us directly).
    fn publish(&mut self, now: Instant) {
        self.my_seq += 1;
        let identity = *self.foca.identity();
        let rec = NodeRecord::signed(
            identity,
            self.my_incarnation,
            self.my_seq,
            self.left,
            Metadata::clone(&self.my_meta),
            self.crypto.as_ref(),
        );
        self.my_record = Arc::new(rec);
        lock(&self.shared).own = (identity, self.my_incarnation);
        if let Some(n) = self.notes.as_mut() {
            n.push(format!(
                "own record seq {} bump {} inc {} via {}",
                self.my_seq, identity.bump, self.my_incarnation, self.ctx
            ));
        }
        self.records.push(
            &self.my_record,
            self.config.swim.max_transmissions.get().into(),
        );
        let mut rt = Collect::default();
        if self.foca.num_members() > 0 && self.foca.gossip(&mut rt).is_err() {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
    }

    /// A witness item of ours, signed: we probed `subject` and got no answer.
    fn witness_item(&self, subject: Identity, incarnation: u16) -> Item {
        let from = self.foca.identity().id;
        Item::Suspect {
            subject,
            incarnation,
            from,
            sig: self
                .crypto
                .sign(&suspect_signed_bytes(&subject, incarnation, &from)),
        }
    }

    /// Takes what foca produced: seals datagrams, arms timers, turns notifications into
    /// events, applies the signed records just accepted, and signs a new record of our own
    /// when our identity or incarnation moved.
    fn absorb(&mut self, rt: Collect, now: Instant) {
        let identity = *self.foca.identity();
        let mut spoke = false;
        let (relay, witnesses) = {
            let mut sh = lock(&self.shared);
            (
                std::mem::take(&mut sh.relay),
                std::mem::take(&mut sh.relay_witnesses),
            )
        };
        let tx: usize = self.config.swim.max_transmissions.get().into();
        for rec in &relay {
            self.records.push(rec, tx);
        }
        for w in &witnesses {
            self.records.push_witness(w, tx);
        }
        for (to, data) in rt.sends {
            // foca tells a member we hold down that it is down (TurnUndead) when it talks to
            // us. When we hold many members down (10 % or more: a split, not one slow or
            // crashed node), also run a push-pull with it: the TurnUndead makes it renew its
            // identity, and its reply brings us its side's state. This is what reconnects the
            // two sides of a healed partition at their first contact.
            let tag_at = 1 + codec::identity_len(&identity) + 2 + codec::identity_len(&to);
            let peer = Peer {
                id: to.id,
                addr: to.socket_addr(),
            };
            if data.get(tag_at) == Some(&codec::TAG_TURN_UNDEAD) && !self.pushpulls.contains(&peer)
            {
                let known = self.foca.iter_membership_state().len();
                let down = self
                    .foca
                    .iter_membership_state()
                    .filter(|m| m.state() == State::Down)
                    .count();
                if down * 10 >= known {
                    self.queue_pushpull(peer);
                }
            }
            let data = if self.config.buddy_system && self.suspects.contains(&to.id) {
                self.buddy(&to, data)
            } else {
                data
            };
            let data = self.piggyback(data);
            if let Ok((h, _)) = codec::decode_header(&data) {
                if h.src == identity {
                    self.my_incarnation = h.src_incarnation;
                    spoke = true;
                }
                if let Message::Ping(probe) = h.message {
                    self.probe_sent(to.id, probe, now);
                }
                if let Some(n) = self.notes.as_mut() {
                    if h.message == Message::TurnUndead {
                        n.push(format!(
                            "send TurnUndead to {} bump {} via {}",
                            to.id, to.bump, self.ctx
                        ));
                    }
                }
            }
            match self.sealer.seal(
                Kind::Datagram,
                &to.id,
                &self.admission,
                self.crypto.as_ref(),
                &data,
            ) {
                Ok(sealed) if sealed.len() <= MAX_DATAGRAM => {
                    self.stats.datagrams_out += 1;
                    self.stats.bytes_out += sealed.len() as u64;
                    self.transmits.push_back(Transmit {
                        dst: to.socket_addr(),
                        data: sealed,
                    });
                }
                Err(SealError::UnknownPeer(_)) | Err(SealError::PeerKey(_)) => {
                    self.stats.dropped_unsealable += 1;
                }
                _ => self.stats.dropped_oversize += 1,
            }
        }
        for (after, timer) in rt.timers {
            match &timer {
                Timer::ProbeRandomMember(t)
                | Timer::PeriodicAnnounce(t)
                | Timer::PeriodicAnnounceDown(t)
                | Timer::PeriodicGossip(t)
                | Timer::SendIndirectProbe { token: t, .. }
                | Timer::ChangeSuspectToDown { token: t, .. } => self.timer_token = Some(*t),
                Timer::RemoveDown(_) => {}
            }
            let after = match timer {
                Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } => {
                    after * self.multiplier()
                }
                _ => after,
            };
            self.timer_seq += 1;
            self.timers.push(Pending {
                deadline: now + after,
                seq: self.timer_seq,
                created: now,
                deferred: false,
                relayed: false,
                timer,
            });
        }
        for note in rt.notes {
            self.notify(note, now);
        }
        let changed: Vec<NodeId> = std::mem::take(&mut lock(&self.shared).changed);
        for id in changed {
            self.meta_changed(id);
        }
        let raised = std::mem::take(&mut lock(&self.shared).raised);
        if !raised.is_empty() {
            self.apply_records(raised, now);
        }
        if !lock(&self.shared).fresh_suspects.is_empty() {
            self.start_checks(now);
        }
        let mut quorums = std::mem::take(&mut lock(&self.shared).quorums);
        if !self.config.dynamic_suspicion {
            // Plain SWIM: only the suspicion timer declares a member down.
            quorums.clear();
        }
        for (subject, inc) in &quorums {
            // A quorum of signed witnesses is as good as seeing it down for flap damping:
            // every node hears the witnesses, while a Down, only a suspicion once relayed,
            // travels one hop. (Its next suspicions are damped, not this one; and it does
            // not count towards the many-downs rule, which counts downs.)
            if !self.witnesses_stale(subject, *inc, now) {
                self.flapped_as(*subject, *inc, now, false);
            }
        }
        quorums.retain(|(subject, inc)| {
            !self.witnesses_stale(subject, *inc, now) && !self.damped(subject, *inc, now)
        });
        for (subject, inc) in quorums {
            let heard = self
                .heard
                .get(&(subject.id, subject.bump, inc))
                .copied()
                .unwrap_or(now);
            self.declares
                .push((heard + self.config.suspicion_min, subject, inc));
        }
        if self.declares.iter().any(|d| d.0 <= now) {
            self.run_declares(now);
        }
        let now_identity = *self.foca.identity();
        if now_identity != identity || (identity != self.my_record.subject && !spoke) {
            // A new identity starts at incarnation 0 (foca resets it).
            self.my_incarnation = 0;
        }
        let identity = now_identity;
        let first_contact = !self.meta_sent && self.foca.num_members() > 0;
        let renewed = identity != self.my_record.subject;
        if first_contact || renewed || self.my_incarnation != self.my_record.incarnation {
            // Our first record goes out when we first have someone to tell (a node that
            // joined nobody, the first of a cluster, included), and a new one whenever our
            // identity or incarnation moves.
            self.meta_sent = true;
            self.publish(now);
        }
        if renewed {
            // A new identity: we were declared down somewhere; our entries go out again.
            self.resend_own(now);
        }
    }

    /// Makes foca refute a suspicion of our current incarnation (it raises it and gossips;
    /// `absorb` then signs and spreads our new record).
    fn refute_now(&mut self, now: Instant) {
        let me = Member::new(*self.foca.identity(), self.my_incarnation, State::Suspect);
        let mut rt = Collect::default();
        if self
            .foca
            .apply_many(std::iter::once(me), true, &mut rt)
            .is_err()
        {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
    }

    /// A datagram from a member foca holds down is ignored by foca, payload included, so a
    /// member that refuted after being declared down could never say so to anyone who holds
    /// it down, and the records it carries would never cross a healed partition (each side
    /// holds the other down). Signed records speak for their authors whoever relays them, so
    /// those in such a datagram are taken here first: a sender that refuted the down is up
    /// again before foca looks at the datagram, and the others' records spread from here.
    fn take_records_from_down_sender(
        &mut self,
        sender: NodeId,
        rest: &[u8],
        broadcast: bool,
        now: Instant,
    ) {
        // Cheap first: a member we announced up is not down.
        if lock(&self.shared).peers.up(&sender).is_some() {
            return;
        }
        let mut r = Reader::new(rest);
        if !broadcast && r.remaining() >= 2 {
            let Ok(n) = r.u16() else { return };
            for _ in 0..n {
                if codec::get_member(&mut r).is_err() {
                    return;
                }
            }
        }
        let mut records = Vec::new();
        let mut entries = Vec::new();
        while r.remaining() > 2 {
            let Ok(len) = r.u16() else { return };
            let Ok(bytes) = r.take(usize::from(len)) else {
                return;
            };
            match Item::decode(bytes) {
                Ok(Item::Node(rec)) => records.push(rec),
                Ok(Item::Entry(e)) => entries.push(e),
                _ => {}
            }
        }
        if records.is_empty() && entries.is_empty() {
            return;
        }
        let down = self
            .foca
            .iter_membership_state()
            .any(|m| m.id().id == sender && m.state() == State::Down);
        if !down {
            return;
        }
        let me = self.foca.identity().id;
        let raised = {
            let mut sh = lock(&self.shared);
            for rec in records {
                if sh.accept_record(Arc::clone(&rec), me).is_some() {
                    sh.relay.push(rec);
                }
            }
            // Entries too (after the datagram, with the others): they speak for their
            // authors as well. If the records just took the sender back up, foca hands us
            // the same entries again, as copies.
            sh.entries_in.extend(entries);
            std::mem::take(&mut sh.raised)
        };
        self.apply_records(raised, now);
    }

    /// Someone declared `member` down at `incarnation` (its `Down`, relayed to us, is only a
    /// suspicion here). Flap damping treats it as seen down, as it did when relayed Downs were
    /// taken as they came (or the nodes that did not declare it themselves would not damp
    /// its next pause); the suspicion running now is not damped, only those after it
    /// refutes. And if we suspect it too, we check it ourselves: silent, we declare it down
    /// as well (a crash is then seen down everywhere about a second after its first
    /// declaration, as when Downs were taken as they came); answering, it stays up. Not for a
    /// member we hold up (after a healed partition each side hears the other's Downs of
    /// hundreds of members it talks to every second), a damped one (its pauses wait
    /// `suspicion_max`), nor while we know we are slow; and at most [`MAX_CHECKS`] at once.
    fn relayed_down(&mut self, member: Identity, incarnation: u16, now: Instant) {
        self.flapped(member, incarnation, now);
        let slow = self.config.local_health && self.health > 0;
        if self.config.dynamic_suspicion
            && !slow
            && self.checks.len() < MAX_CHECKS
            && !self.damped(&member, incarnation, now)
            && self.foca.iter_members().any(|m| {
                m.id() == &member && m.incarnation() == incarnation && m.state() == State::Suspect
            })
        {
            self.check_then_declare(member, incarnation, now);
        }
    }

    /// Gives each suspicion relayed to us its own suspicion timer, as memberlist does. foca
    /// arms a timer only for its own failed probes and otherwise waits for someone's `Down`;
    /// since a relayed `Down` is only a `Suspect` here, every node must be able to declare a
    /// suspect down itself: by a quorum of signed witnesses (the fast path), or by this
    /// timer, which waits `suspicion_max` (stretched by our local health) and is dropped if
    /// the suspicion was refuted meanwhile (see [`Membership::fire`]).
    fn arm_suspicions(&mut self, now: Instant) {
        if self.relayed_suspicions.is_empty() {
            return;
        }
        let Some(token) = self.timer_token else {
            self.relayed_suspicions.clear();
            return;
        };
        if self.armed.len() > 8192 {
            self.armed.clear();
        }
        for (ident, inc) in std::mem::take(&mut self.relayed_suspicions) {
            if self.armed.contains(&(ident.id, ident.bump, inc)) {
                continue;
            }
            let held = self
                .foca
                .iter_members()
                .any(|m| m.id() == &ident && m.incarnation() == inc && m.state() == State::Suspect);
            if !held {
                continue;
            }
            self.armed.insert((ident.id, ident.bump, inc));
            // Our probes to it carry the suspicion (buddy system), so it hears of it.
            self.suspects.insert(ident.id);
            self.timer_seq += 1;
            self.timers.push(Pending {
                deadline: now + self.config.suspicion_max * self.multiplier(),
                seq: self.timer_seq,
                created: now,
                deferred: false,
                relayed: true,
                timer: Timer::ChangeSuspectToDown {
                    member_id: ident,
                    incarnation: inc,
                    token,
                },
            });
        }
    }

    /// Applies to foca what signed records say beyond what it holds: a member alive at a
    /// later identity or incarnation (a refutation or a renewal whose relayed foca record we
    /// dropped or never got), or a member that left. Not spread: every node gets the records.
    fn apply_records(&mut self, records: Vec<Arc<NodeRecord>>, now: Instant) {
        let view: HashMap<NodeId, (Identity, u16, State)> = if records.len() > 8 {
            self.foca
                .iter_membership_state()
                .map(|m| (m.id().id, (*m.id(), m.incarnation(), m.state())))
                .collect()
        } else {
            records
                .iter()
                .filter_map(|r| {
                    self.foca
                        .iter_membership_state()
                        .find(|m| m.id().id == r.subject.id)
                        .map(|m| (m.id().id, (*m.id(), m.incarnation(), m.state())))
                })
                .collect()
        };
        let mut updates = Vec::new();
        let mut revive = Vec::new();
        for r in records {
            self.records
                .refuted(r.subject.id, r.subject.bump, r.incarnation);
            let held = view.get(&r.subject.id);
            if r.leaving {
                // Its own signed word: apply its Down here (others do the same).
                if held.is_some_and(|(id, _, st)| *id == r.subject && *st != State::Down) {
                    updates.push(Member::new(r.subject, r.incarnation, State::Down));
                }
            } else if let Some((id, inc, State::Down)) = held {
                // Declared down at an incarnation it has since refuted, in its own signed
                // word: it is alive (Lifeguard's and memberlist's rule; foca keeps a down
                // identity down, so the record is removed and the member added again).
                if *id == r.subject && r.incarnation > *inc {
                    revive.push(*id);
                    updates.push(Member::new(r.subject, r.incarnation, State::Alive));
                } else if r.subject.newer_than(id) {
                    updates.push(Member::new(r.subject, r.incarnation, State::Alive));
                }
            } else if held.is_none_or(|(id, inc, _)| later((r.subject, r.incarnation), (*id, *inc)))
            {
                updates.push(Member::new(r.subject, r.incarnation, State::Alive));
            }
        }
        if updates.is_empty() {
            return;
        }
        let mut rt = Collect::default();
        for id in revive {
            self.stats.revived += 1;
            if self
                .foca
                .handle_timer(Timer::RemoveDown(id), &mut rt)
                .is_err()
            {
                self.stats.dropped_protocol += 1;
            }
        }
        if self
            .foca
            .apply_many(updates.into_iter(), false, &mut rt)
            .is_err()
        {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
    }

    /// Rewrites a datagram foca made: relayed `Alive` updates about other members
    /// are left out (a receiver takes them only from the member's signed record, which
    /// travels on its own), and signed records from [`RecordQueue`] go in ahead of foca's
    /// custom broadcasts. If the datagram is full, some of foca's other updates make room,
    /// up to half the datagram (foca sends each update many times; these lose one).
    fn piggyback(&mut self, data: Vec<u8>) -> Vec<u8> {
        let Ok((h, hlen)) = codec::decode_header(&data) else {
            return data;
        };
        if matches!(h.message, Message::Announce | Message::TurnUndead) {
            return data;
        }
        let me = self.foca.identity().id;
        let max = self.config.swim.max_packet_size.get();
        let mut r = Reader::new(&data[hlen..]);
        let has_updates = h.message != Message::Broadcast && r.remaining() >= 2;
        let mut members: Vec<Member<Identity>> = Vec::new();
        if has_updates {
            let Ok(n) = r.u16() else { return data };
            for _ in 0..n {
                match codec::get_member(&mut r) {
                    Ok(m) => members.push(m),
                    Err(_) => return data,
                }
            }
        }
        let tail = r.rest();
        let before = members.len();
        if h.message != Message::Feed {
            members.retain(|m| m.state() != State::Alive || m.id().id == me);
        }
        if self.records.is_empty() && members.len() == before {
            return data;
        }
        let head = hlen + if has_updates { 2 } else { 0 };
        let mut used = head + members.iter().map(codec::member_len).sum::<usize>() + tail.len();
        if let Some(smallest) = self.records.smallest() {
            while used + smallest > max && !members.is_empty() && used + smallest > max / 2 {
                if let Some(m) = members.pop() {
                    used -= codec::member_len(&m);
                }
            }
        }
        let mut out = Vec::with_capacity(max);
        out.extend_from_slice(&data[..hlen]);
        if has_updates {
            out.extend_from_slice(&(members.len() as u16).to_be_bytes());
            for m in &members {
                codec_put_member(&mut out, m);
            }
        }
        self.records.fill(&mut out, max.saturating_sub(used));
        out.extend_from_slice(tail);
        out
    }

    /// Lifeguard's buddy system: a probe (`Ping`, `IndirectPing`) to a member we hold as
    /// suspect carries that suspicion, so the member hears of it at once and refutes it.
    /// Without this, a member that was unreachable while the rumour went round (a stalled
    /// host) may never hear of it: each node sends a rumour only `max_transmissions` times.
    fn buddy(&mut self, to: &Identity, data: Vec<u8>) -> Vec<u8> {
        let Some(member) = self.foca.iter_members().find(|m| m.id() == to).cloned() else {
            self.suspects.remove(&to.id);
            return data;
        };
        if member.state() != State::Suspect {
            self.suspects.remove(&to.id);
            return data;
        }
        let Ok((header, hlen)) = codec::decode_header(&data) else {
            return data;
        };
        if !matches!(
            header.message,
            Message::Ping(_) | Message::IndirectPing { .. }
        ) {
            return data;
        }
        let mut r = Reader::new(&data[hlen..]);
        let Ok(count) = r.u16() else {
            return data;
        };
        for _ in 0..count {
            match codec::get_member(&mut r) {
                Ok(m) if m.id() == to && m.state() == State::Suspect => return data,
                Ok(_) => {}
                Err(_) => return data,
            }
        }
        let members_end = data.len() - r.remaining();
        let mut extra = Vec::new();
        codec_put_member(&mut extra, &member);
        if data.len() + extra.len() > self.config.swim.max_packet_size.get() || count == u16::MAX {
            return data;
        }
        let mut out = Vec::with_capacity(data.len() + extra.len());
        out.extend_from_slice(&data[..hlen]);
        out.extend_from_slice(&(count + 1).to_be_bytes());
        out.extend_from_slice(&data[hlen + 2..members_end]);
        out.extend_from_slice(&extra);
        out.extend_from_slice(&data[members_end..]);
        out
    }

    /// Declares down the suspects whose witness quorum has waited `suspicion_min`, unless
    /// they refuted (their incarnation moved on) or changed identity meanwhile.
    fn run_declares(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.declares)
            .into_iter()
            .partition(|d| d.0 <= now);
        self.declares = later;
        for (_, subject, inc) in due {
            let still = self
                .foca
                .iter_members()
                .any(|m| m.id() == &subject && m.incarnation() == inc);
            if !still {
                continue;
            }
            let mut rt = Collect::default();
            if self
                .foca
                .apply_many(
                    std::iter::once(Member::new(subject, inc, State::Down)),
                    true,
                    &mut rt,
                )
                .is_err()
            {
                self.stats.dropped_protocol += 1;
            } else {
                self.stats.declared_down += 1;
                if self.notes.is_some() {
                    let w = self.witnesses(&subject, inc);
                    let heard = self
                        .heard
                        .get(&(subject.id, subject.bump, inc))
                        .map(|h| now.saturating_duration_since(*h).as_secs_f64());
                    if let Some(notes) = self.notes.as_mut() {
                        notes.push(format!(
                            "quorum {} inc {} heard {:?}s ago witnesses {}",
                            subject.id, inc, heard, w
                        ));
                    }
                }
            }
            self.absorb(rt, now);
        }
    }

    fn info(&self, ident: &Identity, state: MemberState) -> MemberInfo {
        MemberInfo {
            id: ident.id,
            addr: ident.socket_addr(),
            bump: ident.bump,
            incarnation: self
                .foca
                .iter_membership_state()
                .find(|m| m.id() == ident)
                .map_or(0, |m| m.incarnation()),
            state,
            metadata: lock(&self.shared)
                .peers
                .record(&ident.id)
                .map(|r| r.meta.clone()),
        }
    }

    fn meta_changed(&mut self, id: NodeId) {
        let Some(announced) = lock(&self.shared).peers.up(&id) else {
            return;
        };
        // An up member's identity is foca's active record for it (kept current by `Rename`).
        let Some(ident) = self
            .foca
            .iter_members()
            .find(|m| m.id().id == id)
            .map(|m| *m.id())
        else {
            return;
        };
        let info = self.info(&ident, MemberState::Up);
        if announced {
            self.events.push_back(Event::Updated(info));
        } else {
            lock(&self.shared).peers.set_up(id, true);
            self.events.push_back(Event::Up(info));
        }
    }

    fn notify(&mut self, note: OwnedNotification<Identity>, now: Instant) {
        match note {
            OwnedNotification::MemberUp(ident) => {
                self.entries.up(&ident.id);
                let info = self.info(&ident, MemberState::Up);
                let known = info.metadata.is_some();
                if !known {
                    // Its metadata broadcast may have gone round before we were there to
                    // hear it: pull the state from the member itself now rather than wait
                    // for the periodic push-pull (up to 30 s away).
                    self.queue_pushpull(Peer {
                        id: ident.id,
                        addr: ident.socket_addr(),
                    });
                }
                let mut sh = lock(&self.shared);
                sh.peers.set_up(ident.id, known);
                if known {
                    // Its record may have come in the same datagram: the Up carries it, no
                    // Updated after it.
                    sh.changed.retain(|c| *c != ident.id);
                    drop(sh);
                    self.events.push_back(Event::Up(info));
                }
            }
            OwnedNotification::MemberDown(ident) => {
                if let Some(n) = self.notes.as_mut() {
                    n.push(format!(
                        "member down {} bump {} via {}",
                        ident.id, ident.bump, self.ctx
                    ));
                }
                let was_up = lock(&self.shared).peers.remove_up(&ident.id);
                let leaving = lock(&self.shared)
                    .peers
                    .record(&ident.id)
                    .is_some_and(|r| r.leaving);
                if !leaving {
                    self.entries
                        .down(ident.id, now, self.config.entries_down_grace);
                    let inc = self
                        .foca
                        .iter_membership_state()
                        .find(|m| m.id() == &ident)
                        .map_or(0, |m| m.incarnation());
                    self.flapped(ident, inc, now);
                }
                if let Some(announced) = was_up {
                    if announced {
                        let info = self.info(&ident, MemberState::Down);
                        self.events.push_back(if leaving {
                            Event::Left(info)
                        } else {
                            Event::Down(info)
                        });
                    }
                }
                if leaving {
                    // After the Left: its entries go with it.
                    let dropped = self.entries.left(ident.id);
                    self.entries_dropped(dropped);
                }
            }
            OwnedNotification::Rename(old, new) => {
                let up = lock(&self.shared).peers.up(&new.id);
                if let Some(announced) = up {
                    if announced && old.socket_addr() != new.socket_addr() {
                        let info = self.info(&new, MemberState::Up);
                        self.events.push_back(Event::Updated(info));
                    }
                }
            }
            OwnedNotification::ProbeFailed(_, ident) => {
                if let Some(n) = self.notes.as_mut() {
                    n.push(format!("probe failed {} bump {}", ident.id, ident.bump));
                }
                self.suspects.insert(ident.id);
                self.stats.probes_failed += 1;
                if self.config.local_health {
                    self.health = (self.health + 1).min(self.config.max_health);
                }
                let inc = self
                    .foca
                    .iter_members()
                    .find(|m| m.id() == &ident)
                    .map(|m| m.incarnation());
                // Plain SWIM (dynamic suspicion off) has no witness items.
                if let Some(incarnation) = inc.filter(|_| self.config.dynamic_suspicion) {
                    if self.witnesses(&ident, incarnation) < QUORUM {
                        let item = self.witness_item(ident, incarnation);
                        let tx = self.config.swim.max_transmissions.get().into();
                        self.records.push_witness(&item, tx);
                    }
                }
            }
            OwnedNotification::Rejoin(new) => {
                if let Some(n) = self.notes.as_mut() {
                    n.push(format!("rejoin as bump {} via {}", new.bump, self.ctx));
                }
                self.renewed = Some(now);
                // We were declared down and came back with a new bump: sync with someone at
                // once, a down member first (it is on the other side of whatever split us).
                if let Some(peer) = self.pick_pushpull_peer() {
                    self.queue_pushpull(peer);
                }
                // Metadata is keyed by node ID, not by bump: the others still hold ours.
            }
            OwnedNotification::Active if self.next_pushpull.is_none() => {
                self.schedule_pushpull(now);
            }
            _ => {}
        }
    }

    // ----- push-pull ------------------------------------------------------------------------

    /// Our full state as one push-pull frame sealed for `to` (without the length prefix):
    /// every member foca knows and every signed record we hold, ours included.
    pub fn pushpull_frame(&mut self, to: NodeId) -> Result<Vec<u8>, PushPullError> {
        let dump = {
            let sh = lock(&self.shared);
            // In node ID order, so runs are reproducible.
            let mut records: Vec<Arc<NodeRecord>> =
                sh.peers.records().map(|(_, r)| Arc::clone(r)).collect();
            records.push(Arc::clone(&self.my_record));
            let mut members: Vec<Member<Identity>> =
                self.foca.iter_membership_state().cloned().collect();
            members.push(Member::new(
                *self.foca.identity(),
                self.my_incarnation,
                State::Alive,
            ));
            StateDump {
                members,
                records,
                entries: Vec::new(),
            }
        };
        let mut dump = dump;
        dump.entries = self.pushpull_entries(&dump);
        let sealed = self
            .sealer
            .seal(
                Kind::Stream,
                &to,
                &self.admission,
                self.crypto.as_ref(),
                &dump.encode(),
            )
            .inspect_err(|e| {
                if matches!(e, SealError::UnknownPeer(_) | SealError::PeerKey(_)) {
                    self.stats.dropped_unsealable += 1;
                }
            })?;
        self.stats.stream_bytes_out += sealed.len() as u64;
        Ok(sealed)
    }

    /// The entries for a push-pull state (every one held), as many as fit in
    /// [`MAX_PUSHPULL_FRAME`] beside the rest of `dump`: ours first, then the others in
    /// (author, key) order; those left out are counted.
    fn pushpull_entries(&mut self, dump: &StateDump) -> Vec<Arc<Entry>> {
        // An upper bound of the rest (encode's own capacity estimate), and the envelope.
        let rest = 9
            + dump.members.iter().map(codec::member_len).sum::<usize>()
            + dump.records.iter().map(|r| 1 + r.item_len()).sum::<usize>()
            + OVERHEAD
            + 4;
        let mut budget = MAX_PUSHPULL_FRAME.saturating_sub(rest);
        let me = self.foca.identity().id;
        let mut out = Vec::with_capacity(self.entries.len());
        let mut omitted = 0;
        let ours = self.entries.of(&me);
        let others = self.entries.iter().filter(|e| e.author != me);
        for e in ours.chain(others) {
            let len = e.encoded_len();
            if len <= budget {
                budget -= len;
                out.push(Arc::clone(e));
            } else {
                omitted += 1;
            }
        }
        self.stats.entries_pushpull_omitted += omitted;
        out
    }

    /// Loads a known state without spreading it (an agent restoring what it saved, or the
    /// simulation forming a cluster at once). Our own metadata is not broadcast either.
    /// Records are verified and members screened as if a peer had sent them.
    pub fn restore(&mut self, dump: &StateDump, now: Instant) {
        self.meta_sent = true;
        let me = *self.foca.identity();
        let members: Vec<Member<Identity>> = {
            let mut sh = lock(&self.shared);
            // A restore into an empty core: size the table once instead of by doubling.
            sh.peers.reserve_exact(dump.records.len());
            for r in &dump.records {
                sh.accept_record(Arc::clone(r), me.id);
            }
            sh.changed.clear();
            // The members below say what foca should hold; the records only vouch for them.
            sh.raised.clear();
            dump.members
                .iter()
                .filter(|m| m.id().id != me.id)
                .filter_map(|m| match screen_member(&sh, m.clone(), None, &me) {
                    Screened::Keep(m) | Screened::Rewritten(m) => Some(m),
                    _ => None,
                })
                .collect()
        };
        let mut rt = Collect::default();
        if self
            .foca
            .apply_many(members.into_iter(), false, &mut rt)
            .is_err()
        {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
        if !dump.entries.is_empty() {
            self.take_entries(dump.entries.clone(), false, 0, now);
        }
        self.synced = true;
    }

    /// Applies a peer's push-pull frame ([`Membership::open_pushpull`] then
    /// [`Membership::apply_pushpull`]). `expect`: the peer we asked, when this is the answer
    /// to our own exchange. Returns the authenticated sender (answer it with
    /// [`Membership::pushpull_frame`]).
    pub fn handle_pushpull(
        &mut self,
        frame: &[u8],
        expect: Option<NodeId>,
        now: Instant,
    ) -> Result<NodeId, PushPullError> {
        let opened = self.open_pushpull(frame, now)?;
        self.apply_pushpull(opened, expect, now)
    }

    /// Opens a push-pull frame: nothing is applied yet, but the sender is authenticated (the
    /// driver takes an exchange slot only then).
    pub fn open_pushpull(&mut self, frame: &[u8], now: Instant) -> Result<Opened, PushPullError> {
        self.stats.stream_bytes_in += frame.len() as u64;
        if frame.len() > MAX_PUSHPULL_FRAME {
            self.stats.dropped_oversize += 1;
            return Err(PushPullError::Oversize(frame.len()));
        }
        // Stream frames are not replay-checked: a replayed frame can only bring back an old
        // state, which signed records (seq) and the rules on relayed member records already
        // treat as stale, and its answer is sealed for the node that really sent it.
        let opened = self
            .sealer
            .open(Kind::Stream, frame, &self.admission, self.crypto.as_ref())
            .inspect_err(|e| match e {
                OpenError::UnknownSender => self.stats.dropped_not_admitted += 1,
                _ => self.stats.dropped_seal += 1,
            })?;
        let bound = u64::try_from(MAX_EPOCH_AHEAD.as_millis()).unwrap_or(u64::MAX);
        if opened.sequence().epoch > self.wall_ms_at(now).saturating_add(bound) {
            self.stats.dropped_future += 1;
            return Err(PushPullError::FutureEpoch(opened.sender()));
        }
        Ok(opened)
    }

    /// Applies an opened push-pull frame. Nothing is applied unless the whole frame decodes.
    /// Signed records are taken first (each verified once), then the members, screened by
    /// the same rules as a datagram's records.
    pub fn apply_pushpull(
        &mut self,
        opened: Opened,
        expect: Option<NodeId>,
        now: Instant,
    ) -> Result<NodeId, PushPullError> {
        let sender = opened.sender();
        if let Some(expected) = expect.filter(|e| *e != sender) {
            self.stats.dropped_spoofed += 1;
            return Err(PushPullError::Spoofed { expected, sender });
        }
        let dump = StateDump::decode(opened.plaintext()).inspect_err(|e| {
            self.stats.dropped_decode += 1;
            if codec::is_oversize_entry(e) {
                self.stats.entries_too_big += 1;
            }
        })?;
        let me = *self.foca.identity();
        let mut downed: Vec<(Identity, u16)> = Vec::new();
        let admitted: Vec<Member<Identity>> = {
            let mut sh = lock(&self.shared);
            for r in dump.records {
                sh.accept_record(r, me.id);
            }
            let mut out = Vec::with_capacity(dump.members.len());
            for m in dump.members {
                if m.id().id != me.id && m.state() != State::Alive && m.id().id != sender {
                    // (a Down becomes a Suspect below)
                    if within(sh.stated(&m.id().id), m.id(), m.incarnation()) {
                        self.relayed_suspicions.push((*m.id(), m.incarnation()));
                    }
                }
                match screen_member(&sh, m, Some(sender), &me) {
                    Screened::Keep(m) => out.push(m),
                    Screened::Rewritten(m) => {
                        self.stats.records_rewritten += 1;
                        if m.id().id != me.id {
                            downed.push((*m.id(), m.incarnation()));
                        }
                        out.push(m);
                    }
                    Screened::NotAdmitted => self.stats.dropped_not_admitted += 1,
                    Screened::Unproven => self.stats.records_dropped += 1,
                }
            }
            out
        };
        for (member, inc) in downed {
            self.relayed_down(member, inc, now);
        }
        if self.notes.is_some() {
            let downs: Vec<String> = admitted
                .iter()
                .filter(|m| m.state() != State::Alive)
                .map(|m| {
                    format!(
                        "{}/{}/{}/{:?}",
                        m.id().id,
                        m.id().bump,
                        m.incarnation(),
                        m.state()
                    )
                })
                .collect();
            self.ctx = format!("push-pull from {sender} non-alive {downs:?}");
        }
        // Updates we already hold are no-ops in foca.
        let mut rt = Collect::default();
        if self
            .foca
            .apply_many(admitted.into_iter(), true, &mut rt)
            .is_err()
        {
            self.stats.dropped_protocol += 1;
        }
        self.absorb(rt, now);
        self.arm_suspicions(now);
        // Entries once the members are applied: an author the state shows up again is
        // welcome again.
        if !dump.entries.is_empty() {
            let spread = if self.synced { MAX_STATE_RELAY } else { 0 };
            self.take_entries(dump.entries, false, spread, now);
        }
        self.synced = true;
        self.take_unparked(now);
        self.stats.pushpull_applied += 1;
        Ok(sender)
    }

    /// The header of a datagram we sealed for `to` (the simulation's debug tally).
    #[doc(hidden)]
    pub fn peek_header(&self, to: &NodeId, data: &[u8]) -> Option<Header<Identity>> {
        let plain = self.sealer.open_own(to, data)?;
        codec::decode_header(&plain).ok().map(|(h, _)| h)
    }
}

/// What [`screen_member`] made of a relayed member record.
enum Screened {
    /// Passed as it came.
    Keep(Member<Identity>),
    /// A `Down` turned into a `Suspect` (which passed).
    Rewritten(Member<Identity>),
    /// About a node not in the directory.
    NotAdmitted,
    /// Says more of its subject than the subject stated.
    Unproven,
}

/// The rule for a member record relayed by `sender` (`None`: our own saved state), see the
/// module docs: a sender speaks for itself; about anyone else, `Down` becomes `Suspect`, and
/// `Alive` and `Suspect` pass only within what their subject stated (for us: our own
/// identity and incarnation).
fn screen_member(
    sh: &Shared,
    m: Member<Identity>,
    sender: Option<NodeId>,
    me: &Identity,
) -> Screened {
    let x = m.id().id;
    if Some(x) == sender {
        return Screened::Keep(m);
    }
    if x != me.id && !sh.admission.admits(&x) {
        return Screened::NotAdmitted;
    }
    if x == me.id && m.id() != me {
        // About another identity of our own node: foca would record it as down and spread
        // that in our name. Nobody else may speak of our identities.
        return Screened::Unproven;
    }
    let (m, rewritten) = if m.state() == State::Down {
        (Member::new(*m.id(), m.incarnation(), State::Suspect), true)
    } else {
        (m, false)
    };
    if x == me.id && m.state() == State::Alive {
        // foca ignores what others say of our liveness.
        return Screened::Keep(m);
    }
    let stated = if x == me.id {
        Some(sh.own)
    } else {
        sh.stated(&x)
    };
    if !within(stated, m.id(), m.incarnation()) {
        return Screened::Unproven;
    }
    if rewritten {
        Screened::Rewritten(m)
    } else {
        Screened::Keep(m)
    }
}

/// Heap bytes of a hashbrown table with `cap` usable slots of `entry` bytes each.
fn map_bytes(cap: usize, entry: usize) -> usize {
    if cap == 0 {
        return 0;
    }
    let buckets = if cap < 8 {
        (cap + 1).next_power_of_two()
    } else {
        (cap * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

fn codec_put_member(v: &mut Vec<u8>, m: &Member<Identity>) {
    let mut c = Codec;
    let _ = foca::Codec::encode_member(&mut c, m, v);
}
