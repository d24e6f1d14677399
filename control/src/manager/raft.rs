//! The managers' Raft group, on openraft: the log and the vote in the node's redb store, the
//! state machine over [`State`], and the peer RPCs over the manager API (2377, mTLS with
//! manager certificates only).
//!
//! - **Log and vote** ([`LogStore`]): every append, truncation, purge and vote is one redb
//!   transaction on the store's own thread; openraft is told an append is flushed only once
//!   that transaction has committed. Nothing of it runs on the async runtime's workers.
//! - **State machine** ([`Machine`]): applies [`Command`]s with [`State::apply`], which decides
//!   every command (a join's secret proof, the quorum rules) so a command that raced another
//!   cannot commit against what came first. Each applied batch is written (state, last applied
//!   entry, this node's membership record) in one transaction before it goes live and out to
//!   the watch streams. Snapshots are the state's record; openraft sends them to new or
//!   lagging managers in chunks of [`SNAPSHOT_CHUNK`].
//! - **Peers** ([`Network`]): mutual-TLS connections opened with
//!   [`ManagerRequest::Raft`](crate::api::ManagerRequest::Raft), then raw frames: a kind byte
//!   and a JSON body; idle ones are kept for the next client. The serving side takes frames
//!   only while the caller's certificate is a manager's of this manager's view, checked again
//!   at every frame (a demoted or removed manager is cut off mid-connection).
//! - **Elections**: openraft 0.9 draws one election timeout per instance, so two survivors can
//!   tie again and again. `elector` calls an election itself when no leader was heard and no
//!   vote changed for the leader lease plus a fresh random draw, each attempt drawing again. A
//!   leader that has not heard from a quorum for [`QUORUM_LEASE`] is not a leader to anyone
//!   asking ([`Node::leader`]): its commands fail at once with docker's no-leader message, and
//!   it does not call itself Leader in `node ls`.
//!
//! Raft IDs are u64 the state machine hands out (`Cluster::next_raft_id`), never reused, apart
//! from node IDs. Who leads comes from Raft only, never from the replicated state.

// openraft's storage and network traits return its error types by value; they are large.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    ChangeMembers, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::api::{read_raw_frame, write_frame, write_raw_frame, FrameError, ManagerRequest};
use crate::cluster::ClusterView;
use crate::id::NodeId;
use crate::manager::state::{Applied, ApplyError, Command, State};
use crate::store::{Membership, MembershipCell, RaftKey, Store, StoreError, Write};
use crate::trust::tls::{manager_client_config, server_name, Issued};

openraft::declare_raft_types!(
    /// The managers' Raft: state machine commands in, their outcomes out.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = Peer,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft of the managers.
pub type Raft = openraft::Raft<TypeConfig>;
type StorageResult<T> = Result<T, StorageError<u64>>;

/// How often the leader sends heartbeats.
pub const HEARTBEAT: Duration = Duration::from_millis(150);
/// The election timeout range (openraft draws once per instance; `elector` draws per
/// attempt). The leader lease is the top of the range.
pub const ELECTION_MIN: Duration = Duration::from_millis(800);
/// See [`ELECTION_MIN`].
pub const ELECTION_MAX: Duration = Duration::from_millis(1200);
/// A leader that has not heard from a quorum for this long is not asked to commit anything.
pub const QUORUM_LEASE: Duration = Duration::from_millis(1500);
/// A peer is `Reachable` if an RPC to it succeeded this recently.
pub const REACHABLE_WITHIN: Duration = Duration::from_millis(1500);
/// How often every manager checks the others (`Reachable`/`Unreachable`).
pub const PROBE_EVERY: Duration = Duration::from_millis(400);
/// Snapshot chunks are at most this large.
pub const SNAPSHOT_CHUNK: u64 = 512 << 10;
/// How long a command waits for a leader and its commit before the no-leader message.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_millis(1800);

/// Docker's words when the managers have no leader (too few of them up).
pub const NO_LEADER: &str = "The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online.";

/// The openraft configuration of the managers.
pub fn config() -> openraft::Config {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: ms(HEARTBEAT),
        election_timeout_min: ms(ELECTION_MIN),
        election_timeout_max: ms(ELECTION_MAX),
        install_snapshot_timeout: 3_000,
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
        snapshot_max_chunk_size: SNAPSHOT_CHUNK,
        max_in_snapshot_log_to_keep: 100,
        // Elections are `elector`'s alone: openraft's own timer fires on a timeout drawn once
        // per instance, so the same manager always went first, and one with an older log kept
        // bumping the term over the one that could win (no write for 30 s in a failover run).
        enable_elect: false,
        ..Default::default()
    }
}

/// A manager as Raft knows it: its node ID and API address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node ID (its certificate must name it).
    pub node: Option<NodeId>,
    /// Its manager API address.
    pub addr: Option<SocketAddr>,
}

/// What applying a command gave: changed or not, or why it was refused.
pub type Outcome = Result<Applied, ApplyError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our own types and openraft's serialize to JSON without fail (no maps with non-string
    // keys, no floats).
    serde_json::to_vec(value).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The log and the vote.

/// The Raft log and vote in the store.
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Arc<Store>,
}

impl LogStore {
    /// Over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    async fn record<T: for<'de> Deserialize<'de>>(
        &self,
        key: RaftKey,
        err: fn(StoreError) -> StorageIOError<u64>,
    ) -> StorageResult<Option<T>> {
        match self
            .store
            .raft_get(key)
            .await
            .map_err(|e| StorageError::from(err(e)))?
        {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StorageIOError::read(&e).into()),
        }
    }

    async fn put<T: Serialize>(
        &self,
        key: RaftKey,
        value: &T,
        err: fn(StoreError) -> StorageIOError<u64>,
    ) -> StorageResult<()> {
        let bytes = json(value);
        self.store
            .write(&[Write::Raft(key, Some(&bytes))])
            .await
            .map_err(|e| err(e).into())
    }
}

fn decode_entry(bytes: &[u8]) -> StorageResult<Entry<TypeConfig>> {
    serde_json::from_slice(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

/// The state a new group of one starts from at `init --force-new-cluster`: what this manager
/// applied, then every command its log holds past that. Some of those may have committed
/// without this manager hearing so yet (a write acknowledged to its client: it must not be
/// lost); the others never committed, so no client was told they did, and keeping them breaks
/// no promise either.
pub async fn last_known_state(store: &Arc<Store>) -> Result<State, StoreError> {
    let corrupt = |key| move |source| StoreError::Corrupt { key, source };
    let mut state = store.manager(State::from_record).await?.unwrap_or_default();
    let applied: AppliedRecord = match store.raft_get(RaftKey::Applied).await? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(corrupt("raft_applied"))?,
        None => AppliedRecord::default(),
    };
    let from = applied.last.map_or(0, |id| id.index + 1);
    let pending = store
        .raft_entries((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
        .await?;
    let mut kept = 0usize;
    for (_, bytes) in pending {
        let entry: Entry<TypeConfig> =
            serde_json::from_slice(&bytes).map_err(corrupt("raft_log"))?;
        if let EntryPayload::Normal(command) = entry.payload {
            kept += usize::from(state.apply(command) == Ok(Applied::Changed));
        }
    }
    if kept > 0 {
        info!(
            kept,
            "kept changes from the log that this manager had not applied yet"
        );
    }
    Ok(state)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> StorageResult<Vec<Entry<TypeConfig>>>
    where
        RB: std::ops::RangeBounds<u64> + Clone + std::fmt::Debug + Send,
    {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let rows = self
            .store
            .raft_entries(bounds)
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        rows.iter().map(|(_, bytes)| decode_entry(bytes)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<u64>> = self
            .record(RaftKey::Purged, |e| StorageIOError::read_logs(&e))
            .await?;
        let last = match self
            .store
            .raft_last()
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, bytes)) => Some(decode_entry(&bytes)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.put(RaftKey::Vote, vote, |e| StorageIOError::write_vote(&e))
            .await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.record(RaftKey::Vote, |e| StorageIOError::read_vote(&e))
            .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, json(&e)))
            .collect();
        // Durable (one committed transaction) before openraft hears it is flushed.
        let result = self.store.raft_append(rows).await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.store
            .raft_truncate(log_id.index)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.store
            .raft_purge(log_id.index, json(&log_id))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

// ---------------------------------------------------------------------------------------
// The state machine.

/// The last applied entry and membership, kept with the state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AppliedRecord {
    last: Option<LogId<u64>>,
    membership: StoredMembership<u64, Peer>,
}

/// What the manager, the state machine and the peer server share: the live state and what
/// goes out of it (the view to the watch streams, this node's membership record).
pub struct Replica {
    /// This node.
    pub self_id: NodeId,
    /// This manager's Raft ID.
    pub raft_id: u64,
    /// Where its API listens.
    pub listen_addr: SocketAddr,
    /// The store.
    pub store: Arc<Store>,
    membership: Arc<MembershipCell>,
    /// This node's own certificate and its expiry.
    own_cert: Mutex<(Issued, u64)>,
    state: Mutex<State>,
    applied: Mutex<AppliedRecord>,
    views: watch::Sender<Arc<ClusterView>>,
    /// When an RPC to each peer last succeeded.
    reach: Mutex<HashMap<u64, Instant>>,
    /// Idle connections to peers, reused by the next client (openraft makes a new client for
    /// every election's vote requests: a TLS handshake each time would eat the vote's deadline).
    pool: Mutex<HashMap<u64, Vec<TlsStream<TcpStream>>>>,
    /// When a leader's append last arrived here.
    heard_leader: Mutex<Instant>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("self_id", &self.self_id)
            .field("raft_id", &self.raft_id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// The replica of node `self_id` (Raft ID `raft_id`), starting from what the store holds
    /// (`state`, maybe empty on a manager that has just joined) and `view` (the membership's).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        self_id: NodeId,
        raft_id: u64,
        listen_addr: SocketAddr,
        own_cert: (Issued, u64),
        state: State,
        store: Arc<Store>,
        membership: Arc<MembershipCell>,
        view: ClusterView,
    ) -> Result<Arc<Self>, StoreError> {
        let applied = match store.raft_get(RaftKey::Applied).await? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    key: "raft_applied",
                    source,
                })?
            }
            None => AppliedRecord::default(),
        };
        let view = state.view().unwrap_or(view);
        let (views, _) = watch::channel(Arc::new(view));
        Ok(Arc::new(Self {
            self_id,
            raft_id,
            listen_addr,
            store,
            membership,
            own_cert: Mutex::new(own_cert),
            state: Mutex::new(state),
            applied: Mutex::new(applied),
            views,
            reach: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            heard_leader: Mutex::new(Instant::now()),
        }))
    }

    /// A copy of the live state.
    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// Reads the live state without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&lock(&self.state))
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.views.borrow().clone()
    }

    /// Changes of the view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.views.subscribe()
    }

    /// This node's certificate and its expiry.
    pub fn own_cert(&self) -> (Issued, u64) {
        lock(&self.own_cert).clone()
    }

    /// Where the other nodes reach this manager's API: its node record's address (its
    /// advertise address), not the listen address, which may be 0.0.0.0.
    pub fn api_addr(&self) -> SocketAddr {
        self.view()
            .node(&self.self_id)
            .and_then(|n| n.api_addr)
            .unwrap_or(self.listen_addr)
    }

    /// The CA certificate (the state's, or the join view's before there is state).
    pub fn ca_der(&self) -> Vec<u8> {
        self.view().ca_cert_der.clone()
    }

    /// Writes `next` (applied up to `last`, with `membership`) and this node's record in one
    /// transaction, and only then makes it live and publishes its view.
    async fn commit(
        &self,
        next: State,
        applied: AppliedRecord,
        snapshot: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let record = crate::store::encoded("manager", next.to_record())?;
        let applied_bytes = json(&applied);
        let view = next.view();
        // This node's record and certificate follow the state only forward: a manager catching
        // up may install a snapshot from before its own promotion (its view, from the watch
        // stream, is newer), and must not read it as a demotion.
        let forward = view.as_ref().filter(|view| {
            self.membership
                .get()
                .is_none_or(|m| !m.view.supersedes(view))
        });
        // This node's certificate as the state has it (a role change or a renewal reissued
        // it for the same key); it goes live with the state, once written.
        let mut own = self.own_cert();
        if let Some(node) = next.cluster().and_then(|c| c.nodes.get(&self.self_id)) {
            if forward.is_some() && !node.cert_der.is_empty() && node.cert_der != own.0.cert_der {
                own.0.cert_der = node.cert_der.clone();
                own.1 = node.cert_not_after;
            }
        }
        let membership = forward.cloned().map(|view| Membership {
            node_id: self.self_id.clone(),
            cert_der: own.0.cert_der.clone(),
            key_pem: own.0.key_pem.clone(),
            cert_not_after: own.1,
            view,
            listen_addr: Some(self.listen_addr),
        });
        let mut writes = vec![
            Write::Manager(&record),
            Write::Raft(RaftKey::Applied, Some(&applied_bytes)),
        ];
        if let Some(m) = &membership {
            writes.push(Write::Membership(m));
        }
        if let Some(s) = &snapshot {
            writes.push(Write::Raft(RaftKey::Snapshot, Some(s)));
        }
        self.store.write(&writes).await?;
        *lock(&self.own_cert) = own;
        let changed = {
            let mut state = lock(&self.state);
            let changed = state.version != next.version || state.cluster.is_none();
            *state = next;
            changed
        };
        *lock(&self.applied) = applied;
        if let (Some(view), true) = (view, changed) {
            self.views.send_replace(Arc::new(view));
        }
        if let Some(m) = membership {
            self.membership.set(Some(m));
        }
        Ok(())
    }

    fn mark_reached(&self, peer: u64) {
        lock(&self.reach).insert(peer, Instant::now());
    }

    /// Whether the manager with Raft ID `peer` answered lately (ourselves always).
    pub fn reachable(&self, peer: u64) -> bool {
        peer == self.raft_id
            || lock(&self.reach)
                .get(&peer)
                .is_some_and(|t| t.elapsed() < REACHABLE_WITHIN)
    }
}

/// The state machine openraft drives.
#[derive(Clone, Debug)]
pub struct Machine {
    replica: Arc<Replica>,
}

impl Machine {
    /// Over `replica`.
    pub fn new(replica: Arc<Replica>) -> Self {
        Self { replica }
    }
}

/// The stored snapshot record does not parse.
#[derive(Debug, thiserror::Error)]
#[error("the stored snapshot record is damaged (its header does not parse)")]
struct DamagedSnapshot;

/// A JSON header and raw bytes after it: the header's length (4 bytes, big-endian), the
/// header, the bytes. A stored snapshot (its meta, its data) and a snapshot chunk on the wire
/// (its header, its bytes) are both this.
fn with_header<H: Serialize>(header: &H, data: &[u8]) -> Vec<u8> {
    let header = json(header);
    let len = u32::try_from(header.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + header.len() + data.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

/// The header and the bytes of [`with_header`]'s output; `None` if it is cut short or the
/// header does not parse.
fn split_header<H: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<(H, &[u8])> {
    let len = usize::try_from(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?)).ok()?;
    let header = serde_json::from_slice(bytes.get(4..4usize.checked_add(len)?)?).ok()?;
    Some((header, &bytes[4 + len..]))
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (state, applied) = {
            let state = lock(&self.replica.state).clone();
            (state, lock(&self.replica.applied).clone())
        };
        let data = state
            .to_record()
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let meta = SnapshotMeta {
            last_log_id: applied.last,
            last_membership: applied.membership.clone(),
            snapshot_id: format!(
                "{}-{:x}",
                applied.last.map_or(0, |l| l.index),
                rand::rngs::OsRng.gen::<u64>()
            ),
        };
        let stored = with_header(&meta, &data);
        self.replica
            .store
            .write(&[Write::Raft(RaftKey::Snapshot, Some(&stored))])
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, Peer>)> {
        let a = lock(&self.replica.applied).clone();
        Ok((a.last, a.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut next = self.replica.state();
        let mut applied = lock(&self.replica.applied).clone();
        let mut out = Vec::new();
        for entry in entries {
            applied.last = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Ok(Applied::Unchanged),
                EntryPayload::Normal(command) => next.apply(command),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Applied::Unchanged)
                }
            });
        }
        let last = applied.last;
        self.replica
            .commit(next, applied, None)
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        debug!(?last, "applied");
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Peer>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state = State::from_record(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let applied = AppliedRecord {
            last: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let stored = with_header(meta, &data);
        self.replica
            .commit(state, applied, Some(stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        info!(last = ?meta.last_log_id, bytes = data.len(), "installed a snapshot of the manager state");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let bytes = self
            .replica
            .store
            .raft_get(RaftKey::Snapshot)
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let (meta, data) = split_header::<SnapshotMeta<u64, Peer>>(&bytes)
            .ok_or_else(|| StorageIOError::read_snapshot(None, &DamagedSnapshot))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}

// ---------------------------------------------------------------------------------------
// Peers.

/// The RPC kinds on a Raft channel (first byte of each request frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Append = 1,
    Vote = 2,
    Snapshot = 3,
    Propose = 4,
    Ping = 5,
    PreVote = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Append,
            2 => Kind::Vote,
            3 => Kind::Snapshot,
            4 => Kind::Propose,
            5 => Kind::Ping,
            6 => Kind::PreVote,
            _ => return None,
        })
    }
}

/// Why an RPC to a peer failed (before the peer answered).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection.
    #[error("manager {addr} is unreachable: {why}")]
    Unreachable {
        /// Its address.
        addr: String,
        /// Why.
        why: String,
    },
    /// The connection broke or the answer did not come in time.
    #[error("manager {addr}: {why}")]
    Broken {
        /// Its address.
        addr: String,
        /// Why.
        why: String,
    },
}

/// The peers of this manager.
#[derive(Clone, Debug)]
pub struct Network {
    replica: Arc<Replica>,
}

impl Network {
    /// For `replica`.
    pub fn new(replica: Arc<Replica>) -> Self {
        Self { replica }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Peer) -> PeerClient {
        PeerClient::new(self.replica.clone(), target, node.clone())
    }
}

/// One connection to one peer, taken from the pool or opened when first needed, and again
/// after it broke; back to the pool when the client goes, unless a request was cut off on it
/// (its answer would reach the next user).
pub struct PeerClient {
    replica: Arc<Replica>,
    target: u64,
    peer: Peer,
    conn: Option<TlsStream<TcpStream>>,
    in_flight: bool,
}

/// Idle connections kept per peer at most.
const POOL_PER_PEER: usize = 4;

impl Drop for PeerClient {
    fn drop(&mut self) {
        if let (Some(conn), false) = (self.conn.take(), self.in_flight) {
            let mut pool = lock(&self.replica.pool);
            let idle = pool.entry(self.target).or_default();
            if idle.len() < POOL_PER_PEER {
                idle.push(conn);
            }
        }
    }
}

impl PeerClient {
    /// A client for peer `target`.
    pub fn new(replica: Arc<Replica>, target: u64, peer: Peer) -> Self {
        Self {
            replica,
            target,
            peer,
            conn: None,
            in_flight: false,
        }
    }

    fn addr_text(&self) -> String {
        self.peer
            .addr
            .map_or_else(|| format!("raft id {}", self.target), |a| a.to_string())
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, PeerError> {
        let unreachable = |why: String| PeerError::Unreachable {
            addr: self.addr_text(),
            why,
        };
        let (Some(node), Some(addr)) = (&self.peer.node, self.peer.addr) else {
            return Err(unreachable("no address known".into()));
        };
        let (own, _) = self.replica.own_cert();
        let config = manager_client_config(&self.replica.ca_der(), &own, node)
            .map_err(|e| unreachable(e.to_string()))?;
        let tcp = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("no answer".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut tls = tokio::time::timeout(
            Duration::from_secs(2),
            TlsConnector::from(config).connect(server_name(), tcp),
        )
        .await
        .map_err(|_| unreachable("the TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS failed: {e}")))?;
        write_frame(&mut tls, &ManagerRequest::Raft)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(tls)
    }

    /// One request and its answer, within `ttl`.
    async fn call(&mut self, kind: Kind, body: &[u8], ttl: Duration) -> Result<Vec<u8>, PeerError> {
        let addr = self.addr_text();
        let result = tokio::time::timeout(ttl, async {
            if self.conn.is_none() {
                let pooled = lock(&self.replica.pool)
                    .get_mut(&self.target)
                    .and_then(Vec::pop);
                self.conn = match pooled {
                    Some(conn) => Some(conn),
                    None => Some(self.connect().await?),
                };
            }
            let broken = |why: String| PeerError::Broken {
                addr: addr.clone(),
                why,
            };
            let Some(conn) = self.conn.as_mut() else {
                return Err(broken("not connected".into()));
            };
            let mut frame = Vec::with_capacity(1 + body.len());
            frame.push(kind as u8);
            frame.extend_from_slice(body);
            self.in_flight = true;
            write_raw_frame(conn, &frame)
                .await
                .map_err(|e| broken(e.to_string()))?;
            let answer = match read_raw_frame(conn).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err(broken("closed the connection".into())),
                Err(e) => Err(broken(e.to_string())),
            };
            self.in_flight = false;
            answer
        })
        .await
        .unwrap_or_else(|_| {
            Err(PeerError::Broken {
                addr: addr.clone(),
                why: "no answer in time".into(),
            })
        });
        match &result {
            Ok(_) => self.replica.mark_reached(self.target),
            Err(_) => self.conn = None,
        }
        result
    }

    /// One openraft RPC: `body` out, the peer's `Result` back, its error as a remote one.
    async fn rpc<Resp, E>(
        &mut self,
        kind: Kind,
        body: &[u8],
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, Peer, RaftError<u64, E>>>
    where
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let answer = self
            .call(kind, body, option.hard_ttl())
            .await
            .map_err(|e| match e {
                PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                PeerError::Broken { .. } => RPCError::Network(NetworkError::new(&e)),
            })?;
        let decoded: Result<Resp, RaftError<u64, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Asks the peer (the leader) to commit `command`; its outcome and log index.
    pub async fn propose(
        &mut self,
        command: &Command,
        ttl: Duration,
    ) -> Result<Proposed, PeerError> {
        let answer = self.call(Kind::Propose, &json(command), ttl).await?;
        serde_json::from_slice(&answer).map_err(|e| PeerError::Broken {
            addr: self.addr_text(),
            why: format!("a bad answer: {e}"),
        })
    }

    /// Whether the peer would vote for a candidate whose log ends at `last` (a pre-vote: it
    /// changes nothing there).
    pub async fn would_vote(&mut self, last: Option<LogId<u64>>, ttl: Duration) -> bool {
        match self.call(Kind::PreVote, &json(&last), ttl).await {
            Ok(answer) => serde_json::from_slice(&answer).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// A cheap round trip (reachability).
    pub async fn ping(&mut self, ttl: Duration) -> Result<(), PeerError> {
        self.call(Kind::Ping, b"", ttl).await.map(|_| ())
    }
}

/// A leader's answer to a forwarded command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Proposed {
    /// Committed at this log index, with this outcome.
    Committed {
        /// The entry's index.
        index: u64,
        /// What applying it gave.
        outcome: Outcome,
    },
    /// Not the leader (any more).
    NotLeader,
    /// No commit in time (no quorum).
    NoQuorum,
}

/// The header of a snapshot chunk (the chunk's bytes follow it on the wire).
#[derive(Serialize, Deserialize)]
struct ChunkHeader {
    vote: Vote<u64>,
    meta: SnapshotMeta<u64, Peer>,
    offset: u64,
    done: bool,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Peer, RaftError<u64>>> {
        self.rpc(Kind::Append, &json(&rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, Peer, RaftError<u64, InstallSnapshotError>>,
    > {
        // The chunk's bytes travel raw after a small JSON header, not as a JSON array.
        let header = ChunkHeader {
            vote: rpc.vote,
            meta: rpc.meta,
            offset: rpc.offset,
            done: rpc.done,
        };
        self.rpc(Kind::Snapshot, &with_header(&header, &rpc.data), &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Peer, RaftError<u64>>> {
        self.rpc(Kind::Vote, &json(&rpc), &option).await
    }
}

/// Why a Raft channel from a peer ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A request that does not parse.
    #[error("a bad Raft request: {0}")]
    Bad(String),
    /// The caller is no longer a manager.
    #[error("the peer is no longer a manager")]
    NotManager,
    /// This manager's Raft node stopped (a demotion, a restart in the same agent): the peer
    /// reconnects to whatever serves next.
    #[error("this manager's Raft stopped")]
    Stopped,
}

/// Serves one peer's Raft channel on `stream` until it closes, or until `allowed` says its
/// caller is no longer a manager (checked before every frame: a demoted or removed manager's
/// open connection carries nothing more).
pub async fn serve_peer<S>(
    node: Arc<Node>,
    mut stream: S,
    allowed: impl Fn() -> bool,
) -> Result<(), ServeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(frame) = read_raw_frame(&mut stream).await? {
        if !allowed() {
            return Err(ServeError::NotManager);
        }
        if node.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ServeError::Stopped);
        }
        let (&kind, body) = frame
            .split_first()
            .ok_or_else(|| ServeError::Bad("an empty frame".into()))?;
        let kind = Kind::from_byte(kind).ok_or_else(|| ServeError::Bad(format!("kind {kind}")))?;
        let bad = |e: serde_json::Error| ServeError::Bad(e.to_string());
        let answer = match kind {
            Kind::Append => {
                let req: AppendEntriesRequest<TypeConfig> =
                    serde_json::from_slice(body).map_err(bad)?;
                let answer = node.raft.append_entries(req).await;
                // A leader is heard only when this manager took it as one (not a deposed
                // leader's append, refused for its older term).
                if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                    *lock(&node.replica.heard_leader) = Instant::now();
                }
                json(&answer)
            }
            Kind::Vote => {
                let req: VoteRequest<u64> = serde_json::from_slice(body).map_err(bad)?;
                json(&node.raft.vote(req).await)
            }
            Kind::Snapshot => {
                let (header, data) = split_header::<ChunkHeader>(body)
                    .ok_or_else(|| ServeError::Bad("a snapshot chunk without its header".into()))?;
                let req = InstallSnapshotRequest {
                    vote: header.vote,
                    meta: header.meta,
                    offset: header.offset,
                    data: data.to_vec(),
                    done: header.done,
                };
                let answer = node.raft.install_snapshot(req).await;
                if answer.is_ok() {
                    *lock(&node.replica.heard_leader) = Instant::now();
                }
                json(&answer)
            }
            Kind::Propose => {
                let command: Command = serde_json::from_slice(body).map_err(bad)?;
                json(&node.commit_here(command).await)
            }
            Kind::Ping => Vec::new(),
            Kind::PreVote => {
                let theirs: Option<LogId<u64>> = serde_json::from_slice(body).map_err(bad)?;
                json(&node.would_vote(theirs).await)
            }
        };
        write_raw_frame(&mut stream, &answer).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Raft node: openraft, the replica, elections, membership.

/// A manager's Raft node.
pub struct Node {
    /// openraft.
    pub raft: Raft,
    /// The state and what goes out of it.
    pub replica: Arc<Replica>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set by [`Node::shutdown`]: open peer channels end at their next frame.
    stopped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// The pre-vote rule: not while this manager leads (a candidate that calls just after it won,
/// their timers close together, must not unseat it) or heard a leader within
/// [`ELECTION_MIN`], and not for a log behind `ours`.
pub(crate) fn grants_pre_vote(
    leading: bool,
    quiet: Duration,
    ours: Option<LogId<u64>>,
    theirs: Option<LogId<u64>>,
) -> bool {
    !leading
        && quiet >= ELECTION_MIN
        && matches!(
            theirs.partial_cmp(&ours),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        )
}

/// How long a manager that starts waits for its first snapshot (see `snapshot_the_start`).
const START_SNAPSHOT_WITHIN: Duration = Duration::from_secs(5);

/// Why the Raft node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// openraft refused the configuration or its storage.
    #[error("the managers' Raft did not start: {0}")]
    Raft(String),
}

/// Why a command did not commit.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// No leader, or no quorum in time.
    #[error("{NO_LEADER}")]
    NoLeader,
    /// The state machine refused it.
    #[error(transparent)]
    Refused(#[from] ApplyError),
}

impl Node {
    /// Starts openraft over `replica`. `bootstrap`: this manager forms a new group of one (a
    /// fresh `init`, or a state dir from before Raft), if its log is empty.
    pub async fn start(replica: Arc<Replica>, bootstrap: bool) -> Result<Arc<Self>, StartError> {
        let config = Arc::new(
            config()
                .validate()
                .map_err(|e| StartError::Raft(e.to_string()))?,
        );
        let raft = Raft::new(
            replica.raft_id,
            config,
            Network::new(replica.clone()),
            LogStore::new(replica.store.clone()),
            Machine::new(replica.clone()),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        if bootstrap && !raft.is_initialized().await.unwrap_or(true) {
            let me = Peer {
                node: Some(replica.self_id.clone()),
                addr: Some(replica.api_addr()),
            };
            raft.initialize(BTreeMap::from([(replica.raft_id, me)]))
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
            info!(raft_id = replica.raft_id, "formed a manager group of one");
        }
        let node = Arc::new(Self {
            raft,
            replica,
            tasks: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        let tasks = vec![
            tokio::spawn(elector(Arc::downgrade(&node))),
            tokio::spawn(prober(Arc::downgrade(&node))),
            tokio::spawn(membership_keeper(Arc::downgrade(&node))),
        ];
        *lock(&node.tasks) = tasks;
        node.snapshot_the_start().await;
        Ok(node)
    }

    /// A group formed over a state its log does not hold (a state from before Raft, or `init
    /// --force-new-cluster`) must never send a new manager its log from the start: replaying
    /// it would miss that state. Such a log has nothing purged yet and no `init` near its
    /// start; its manager (the group's only one) builds a snapshot of its state and purges the
    /// log up to it, so a manager that joins gets the snapshot first. Checked at every start,
    /// so a crash between forming the group and the purge is mended at the next.
    async fn snapshot_the_start(&self) {
        // From the store: openraft's metrics are not filled in yet this early.
        let purged = {
            let mut log = LogStore::new(self.replica.store.clone());
            log.get_log_state().await.map(|s| s.last_purged_log_id)
        };
        if !matches!(purged, Ok(None)) || !self.replica.with_state(|s| s.cluster().is_some()) {
            return;
        }
        // `init` commits within the first entries of a group it began (membership, the
        // leader's blank entry, then `init`).
        let first = self
            .replica
            .store
            .raft_entries((std::ops::Bound::Included(0), std::ops::Bound::Excluded(8)))
            .await
            .unwrap_or_default();
        let began_with_init = first.iter().any(|(_, bytes)| {
            serde_json::from_slice::<Entry<TypeConfig>>(bytes)
                .is_ok_and(|e| matches!(e.payload, EntryPayload::Normal(Command::Init(_))))
        });
        if began_with_init {
            return;
        }
        let wait = || self.raft.wait(Some(START_SNAPSHOT_WITHIN));
        let applied = match wait()
            .metrics(|m| m.last_applied.is_some(), "the log's start applied")
            .await
        {
            Ok(m) => m.last_applied,
            Err(e) => {
                warn!("no first snapshot of the manager state yet: {e}");
                return;
            }
        };
        if self.raft.trigger().snapshot().await.is_err() {
            return;
        }
        match wait()
            .metrics(|m| m.snapshot >= applied, "a snapshot of the start")
            .await
        {
            Ok(m) => {
                if let Some(upto) = m.snapshot {
                    let _ = self.raft.trigger().purge_log(upto.index).await;
                    let purged = wait()
                        .metrics(
                            |m| m.purged >= Some(upto),
                            "the log purged up to the snapshot",
                        )
                        .await;
                    if let Err(e) = purged {
                        warn!("the log is not purged up to the first snapshot yet: {e}");
                    }
                }
            }
            Err(e) => warn!("no first snapshot of the manager state yet: {e}"),
        }
    }

    /// Stops openraft and the tasks around it.
    pub async fn shutdown(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let _ = self.raft.shutdown().await;
    }

    /// The leader's Raft ID, if there is one this manager trusts: itself only while it heard
    /// from a quorum within [`QUORUM_LEASE`] (a leader cut off from the others is none).
    pub fn leader(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        if leader == self.replica.raft_id {
            let fresh = m
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < QUORUM_LEASE.as_millis());
            return fresh.then_some(leader);
        }
        Some(leader)
    }

    /// The last entry of this manager's log (or of what it purged), if any.
    async fn last_log(&self) -> Option<LogId<u64>> {
        let mut log = LogStore::new(self.replica.store.clone());
        log.get_log_state().await.ok()?.last_log_id
    }

    /// A pre-vote: whether this manager would vote for a candidate whose log ends at `theirs`
    /// now. Not while it hears a leader, and not for a log behind its own (Raft's rule, asked
    /// before the election: a manager with an older log, back from a crash, cannot start
    /// elections it cannot win, each bumping the term over the one that could).
    pub(crate) async fn would_vote(&self, theirs: Option<LogId<u64>>) -> bool {
        let leading = self.raft.metrics().borrow().state == openraft::ServerState::Leader;
        grants_pre_vote(
            leading,
            self.leader_quiet_for(),
            self.last_log().await,
            theirs,
        )
    }

    /// Whether a leader is alive as this manager sees it: itself with a fresh quorum, or
    /// another that reached it within [`QUORUM_LEASE`].
    pub fn hears_leader(&self) -> bool {
        match self.leader() {
            Some(id) if id == self.replica.raft_id => true,
            Some(_) => self.leader_quiet_for() < QUORUM_LEASE,
            None => false,
        }
    }

    /// How long since a leader's append or snapshot last reached this manager.
    pub fn leader_quiet_for(&self) -> Duration {
        lock(&self.replica.heard_leader).elapsed()
    }

    /// Whether this manager is in the Raft group's membership (a voter or a learner).
    pub fn in_group(&self) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.replica.raft_id)
            .is_some()
    }

    /// Waits (at most `limit`) until the manager with Raft ID `raft_id` is out of the Raft
    /// group as this manager knows it; whether it is.
    pub async fn left_group(&self, raft_id: u64, limit: Duration) -> bool {
        let out = |m: &openraft::RaftMetrics<u64, Peer>| {
            m.membership_config
                .membership()
                .get_node(&raft_id)
                .is_none()
        };
        let mut metrics = self.raft.metrics();
        tokio::time::timeout(limit, async {
            loop {
                if out(&metrics.borrow_and_update()) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && out(&self.raft.metrics().borrow())
    }

    /// The voters' Raft IDs.
    pub fn voters(&self) -> BTreeSet<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    fn peer_of(&self, id: u64) -> Option<Peer> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Commits `command` here, as the leader (a forwarded one, or our own).
    async fn commit_here(&self, command: Command) -> Proposed {
        if self.leader() != Some(self.replica.raft_id) {
            return Proposed::NotLeader;
        }
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(command)).await {
            Ok(Ok(r)) => Proposed::Committed {
                index: r.log_id.index,
                outcome: r.data,
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Proposed::NotLeader
            }
            Ok(Err(e)) => {
                warn!("a command did not commit: {e}");
                Proposed::NoQuorum
            }
            Err(_) => Proposed::NoQuorum,
        }
    }

    /// Commits `command` through the leader, wherever it is, and waits until this manager has
    /// applied it too: what the caller reads next includes it. Within [`PROPOSE_TIMEOUT`], or
    /// [`ProposeError::NoLeader`].
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ProposeError::NoLeader);
            }
            let answer = match self.leader() {
                Some(id) if id == self.replica.raft_id => self.commit_here(command.clone()).await,
                Some(id) => match self.peer_of(id) {
                    Some(peer) => {
                        let mut client = PeerClient::new(self.replica.clone(), id, peer);
                        match client.propose(&command, left).await {
                            Ok(p) => p,
                            Err(e) => {
                                debug!("forwarding a command to the leader: {e}");
                                Proposed::NotLeader
                            }
                        }
                    }
                    None => Proposed::NotLeader,
                },
                None => Proposed::NotLeader,
            };
            match answer {
                Proposed::Committed { index, outcome } => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let _ = self
                        .raft
                        .wait(Some(left.max(Duration::from_millis(500))))
                        .applied_index_at_least(Some(index), "the command applied here")
                        .await;
                    return Ok(outcome?);
                }
                Proposed::NoQuorum => return Err(ProposeError::NoLeader),
                Proposed::NotLeader => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Whether the manager with Raft ID `raft_id` answered this one lately (itself always).
    pub fn reachable(&self, raft_id: u64) -> bool {
        self.replica.reachable(raft_id)
    }
}

/// Calls an election when no leader was heard for the lease plus a random draw, drawn anew for
/// every attempt (openraft 0.9 draws its timeout once per instance: survivors can tie forever).
async fn elector(node: std::sync::Weak<Node>) {
    let mut wait = draw();
    let mut since = Instant::now();
    let mut vote = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Some(node) = node.upgrade() else { return };
        let m = node.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        let voter = voters.contains(&node.replica.raft_id);
        // The only voter elects itself at once (openraft's timer would have; it is off).
        if voter && voters.len() == 1 && m.current_leader.is_none() {
            let _ = node.raft.trigger().elect().await;
            continue;
        }
        // A vote granted (or a term seen) is an election under way: let it finish before
        // calling another, or two candidates undo each other's wins forever.
        let changed = vote.as_ref() != Some(&m.vote);
        vote = Some(m.vote);
        if !voter || changed || m.state == openraft::ServerState::Leader {
            since = Instant::now();
            continue;
        }
        let heard = *lock(&node.replica.heard_leader);
        let quiet = heard.elapsed().min(since.elapsed());
        if quiet >= wait {
            since = Instant::now();
            wait = draw();
            if pre_vote(&node, &voters).await {
                debug!(
                    raft_id = node.replica.raft_id,
                    "no leader heard: calling an election"
                );
                let _ = node.raft.trigger().elect().await;
            }
        }
    }
}

/// Whether a majority of `voters` (this manager included) would vote for it now.
async fn pre_vote(node: &Arc<Node>, voters: &BTreeSet<u64>) -> bool {
    let last = node.last_log().await;
    let mut asks = tokio::task::JoinSet::new();
    for &id in voters.iter().filter(|id| **id != node.replica.raft_id) {
        let Some(peer) = node.peer_of(id) else {
            continue;
        };
        let mut client = PeerClient::new(node.replica.clone(), id, peer);
        asks.spawn(async move { client.would_vote(last, PRE_VOTE_WAIT).await });
    }
    let mut yes = 1; // its own
    while let Some(answer) = asks.join_next().await {
        yes += usize::from(answer.unwrap_or(false));
    }
    yes > voters.len() / 2
}

/// How long a pre-vote waits for the others' answers.
const PRE_VOTE_WAIT: Duration = Duration::from_millis(300);

/// The lease plus a fresh random part of the election range.
fn draw() -> Duration {
    let spread = ELECTION_MAX.saturating_sub(ELECTION_MIN);
    let jitter = rand::rngs::OsRng.gen_range(0..=u64::try_from(spread.as_millis()).unwrap_or(0));
    ELECTION_MAX + Duration::from_millis(jitter)
}

/// Pings every other manager (reachability for `node ls`, from this manager's side).
async fn prober(node: std::sync::Weak<Node>) {
    let mut clients: HashMap<u64, PeerClient> = HashMap::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(node) = node.upgrade() else { return };
        let members: Vec<(u64, Peer)> = node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != node.replica.raft_id)
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        clients.retain(|id, _| members.iter().any(|(m, _)| m == id));
        let mut pings = tokio::task::JoinSet::new();
        for (id, peer) in members {
            let mut client = clients
                .remove(&id)
                .unwrap_or_else(|| PeerClient::new(node.replica.clone(), id, peer));
            pings.spawn(async move {
                let _ = client.ping(PROBE_EVERY * 2).await;
                (id, client)
            });
        }
        drop(node);
        while let Some(Ok((id, client))) = pings.join_next().await {
            clients.insert(id, client);
        }
    }
}

/// On the leader: keeps the Raft voters equal to the managers of the state. New managers are
/// added as learners, made voters once caught up; demoted, left or removed ones are taken
/// out. One change at a time.
async fn membership_keeper(node: std::sync::Weak<Node>) {
    let Some(mut views) = node.upgrade().map(|n| n.replica.subscribe()) else {
        return;
    };
    loop {
        // A change of the managers shows in the view; the tick retries what did not go through.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = views.changed() => {}
        }
        let Some(node) = node.upgrade() else { return };
        if node.leader() != Some(node.replica.raft_id) {
            continue;
        }
        let wanted: BTreeMap<u64, Peer> = node.replica.with_state(|s| {
            s.cluster()
                .map(|c| {
                    c.managers()
                        .filter_map(|n| {
                            Some((
                                n.raft_id?,
                                Peer {
                                    node: Some(n.id.clone()),
                                    addr: n.api_addr,
                                },
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        if wanted.is_empty() {
            continue;
        }
        let (voters, learners): (BTreeSet<u64>, BTreeSet<u64>) = {
            let m = node.raft.metrics().borrow().membership_config.clone();
            let membership = m.membership();
            (
                membership.voter_ids().collect(),
                membership.learner_ids().collect(),
            )
        };
        if let Some((&id, peer)) = wanted
            .iter()
            .find(|(id, _)| !voters.contains(id) && !learners.contains(id))
        {
            info!(raft_id = id, node = ?peer.node, "adding a manager to the Raft group");
            if let Err(e) = node.raft.add_learner(id, peer.clone(), false).await {
                warn!("could not add manager {id} as a learner: {e}");
            }
            continue;
        }
        if let Some(&id) = learners.iter().find(|id| wanted.contains_key(id)) {
            if caught_up(&node, id) {
                info!(raft_id = id, "a manager has caught up: making it a voter");
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                if let Err(e) = node.raft.change_membership(change, false).await {
                    warn!("could not make manager {id} a voter: {e}");
                }
            }
            continue;
        }
        let gone = |ids: &BTreeSet<u64>| -> BTreeSet<u64> {
            ids.iter()
                .filter(|id| !wanted.contains_key(id))
                .copied()
                .collect()
        };
        // Voters go with `RemoveVoters` (not kept as learners); learners with `RemoveNodes`,
        // which refuses a voter.
        let change = match (gone(&voters), gone(&learners)) {
            (v, _) if !v.is_empty() => Some(ChangeMembers::RemoveVoters(v)),
            (_, l) if !l.is_empty() => Some(ChangeMembers::RemoveNodes(l)),
            _ => None,
        };
        if let Some(change) = change {
            info!(?change, "taking managers out of the Raft group");
            if let Err(e) = node.raft.change_membership(change, false).await {
                warn!("could not take managers out of the Raft group: {e}");
            }
        }
    }
}

/// Whether learner `id` has the log up to near the leader's end.
fn caught_up(node: &Node, id: u64) -> bool {
    let m = node.raft.metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    m.replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .is_some_and(|matched| matched.index + 8 >= last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log store and a state machine over a fresh store, for openraft's own storage suite.
    struct Fresh;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, Machine, tempfile::TempDir> for Fresh {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, Machine)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let store = Arc::new(
                Store::open(dir.path())
                    .await
                    .map_err(|e| StorageIOError::write(&e))?,
            );
            let own = Issued {
                cert_der: Vec::new(),
                key_pem: String::new(),
            };
            let replica = Replica::open(
                NodeId::from_random(1),
                1,
                "127.0.0.1:2377".parse().unwrap(),
                (own, 0),
                State::default(),
                store.clone(),
                MembershipCell::new(None),
                ClusterView::empty(),
            )
            .await
            .map_err(|e| StorageIOError::read(&e))?;
            Ok((dir, LogStore::new(store), Machine::new(replica)))
        }
    }

    /// openraft's conformance suite for log stores and state machines: the log state after
    /// appends, truncations and purges, the vote, the applied state and membership, snapshots
    /// built, installed and read back.
    #[test]
    fn the_log_and_the_state_machine_pass_openraft_storage_suite() {
        openraft::testing::Suite::test_all(Fresh).unwrap();
    }

    #[test]
    fn a_header_and_bytes_round_trip_and_a_cut_one_is_refused() {
        let framed = with_header(&("meta", 7u32), b"data bytes");
        let (header, data) = split_header::<(String, u32)>(&framed).unwrap();
        assert_eq!(
            (header.0.as_str(), header.1, data),
            ("meta", 7, &b"data bytes"[..])
        );
        for cut in [0, 3, 4, 10] {
            assert!(
                split_header::<(String, u32)>(&framed[..cut]).is_none(),
                "{cut}"
            );
        }
        let mut huge = framed.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(split_header::<(String, u32)>(&huge).is_none());
    }

    /// `init --force-new-cluster` starts from the applied state and every command the log
    /// holds past it: a change that committed before this manager heard so is not lost.
    #[tokio::test]
    async fn the_last_known_state_takes_the_log_past_what_was_applied() {
        use crate::manager::state::tests::{init_cmd, node};
        use crate::manager::state::Role;
        use openraft::testing::StoreBuilder as _;
        let (_dir, _log, mut machine) = Fresh.build().await.unwrap();
        let store = machine.replica.store.clone();
        let commands = [
            init_cmd(),
            Command::AddNode(Box::new(node(2, Role::Worker))),
            Command::AddNode(Box::new(node(3, Role::Worker))),
        ];
        let entries: Vec<Entry<TypeConfig>> = commands
            .iter()
            .zip(1..)
            .map(|(c, index)| Entry {
                log_id: openraft::testing::log_id(1, 1, index),
                payload: EntryPayload::Normal(c.clone()),
            })
            .collect();
        store
            .raft_append(entries.iter().map(|e| (e.log_id.index, json(e))).collect())
            .await
            .unwrap();
        // Only the first is applied (and so in the state record).
        machine.apply(entries[..1].to_vec()).await.unwrap();
        let mut all = State::default();
        for c in commands {
            all.apply(c).unwrap();
        }
        let known = last_known_state(&store).await.unwrap();
        assert_eq!(known, all);
        assert!(known
            .cluster()
            .unwrap()
            .nodes
            .contains_key(&node(3, Role::Worker).id));
        // Everything applied: the state record alone.
        machine.apply(entries[1..].to_vec()).await.unwrap();
        assert_eq!(last_known_state(&store).await.unwrap(), all);
    }
}
