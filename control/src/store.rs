//! The node's persistent state in `--state-dir`, in one redb file.
//!
//! Four records: the node's X25519 static secret, its data-path incarnation, its swarm
//! membership (ID, certificate, the last cluster view) and, on a manager, the manager state.
//! Every change is one redb write transaction, so a crash at any point leaves the old state
//! or the new one.
//!
//! The membership and manager records are versioned on disk (`{"v1": ...}`), apart from the
//! types the code works with: [`Membership`] is converted to and from its record here, and
//! keeps the cluster view in the form it travelled in (`shoal_proto::view::View`, itself
//! versioned), so the wire format, the disk format and the in-memory model each change on
//! their own. A record in a format this build does not read is refused with its name, never
//! half-read.
//!
//! The database lives on a thread of its own, which runs every read and commit in the order
//! asked; the API is async and waits for it. A commit's fsync can take long on a busy or slow
//! disk, and the agent's async runtime has two workers that gossip shares: an fsync there
//! would stall gossip's timers and raise its local health (see `manager`'s tests).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, Role};
use crate::id::NodeId;

const TABLE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("shoal");
/// The managers' Raft log, by index (see `manager::raft`).
const RAFT_LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_log");
/// This node's attachments of containers to user networks (`agent::cni` owns their keys and
/// format; the store keeps bytes), one record each.
const ATTACHMENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("attachments");
const NODE_KEY: &str = "node_key";
const INCARNATION: &str = "incarnation";

/// Length of the data path's incarnation.
pub const INCARNATION_LEN: usize = 16;

/// Reads an incarnation record: 16 bytes, or the 4-byte counter of agents before the data
/// path's envelope version 2 (read as its bytes followed by zeros).
fn parse_incarnation(v: &[u8]) -> Result<[u8; INCARNATION_LEN], StoreError> {
    let mut out = [0u8; INCARNATION_LEN];
    match v.len() {
        INCARNATION_LEN => out.copy_from_slice(v),
        4 => out[..4].copy_from_slice(v),
        _ => return Err(StoreError::Incarnation("damaged")),
    }
    Ok(out)
}
const MEMBERSHIP: &str = "membership";
const MANAGER: &str = "manager";

/// File name of the store inside the state dir.
pub const FILE_NAME: &str = "shoal.redb";

/// This node's place in a swarm, kept after a successful join or init.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// Our node ID.
    pub node_id: NodeId,
    /// Our node certificate (DER), signed by the cluster CA: our mTLS identity.
    pub cert_der: Vec<u8>,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// When that certificate expires (Unix seconds).
    pub cert_not_after: u64,
    /// The last cluster view we received.
    pub view: ClusterView,
    /// Where this node's manager API listens (leader only).
    pub listen_addr: Option<std::net::SocketAddr>,
}

/// The membership record on disk, one variant per format.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MembershipRecord {
    V1(MembershipV1),
}

/// Format 1 of the membership record.
#[derive(Serialize, Deserialize)]
struct MembershipV1 {
    node_id: NodeId,
    cert_der: Vec<u8>,
    key_pem: String,
    cert_not_after: u64,
    view: shoal_proto::view::View,
    listen_addr: Option<std::net::SocketAddr>,
}

impl From<&Membership> for MembershipRecord {
    fn from(m: &Membership) -> Self {
        MembershipRecord::V1(MembershipV1 {
            node_id: m.node_id.clone(),
            cert_der: m.cert_der.clone(),
            key_pem: m.key_pem.clone(),
            cert_not_after: m.cert_not_after,
            view: m.view.to_wire(),
            listen_addr: m.listen_addr,
        })
    }
}

impl From<MembershipRecord> for Membership {
    fn from(r: MembershipRecord) -> Self {
        match r {
            MembershipRecord::V1(m) => Membership {
                node_id: m.node_id,
                cert_der: m.cert_der,
                key_pem: m.key_pem,
                cert_not_after: m.cert_not_after,
                view: ClusterView::from_wire(m.view),
                listen_addr: m.listen_addr,
            },
        }
    }
}

impl Membership {
    /// Our role in the last view (worker if we are not in it).
    pub fn role(&self) -> Role {
        self.view
            .node(&self.node_id)
            .map_or(Role::Worker, |n| n.role)
    }
}

/// The membership record in memory, shared by the agent, its manager and its watch stream;
/// every change is announced to [`MembershipCell::subscribe`]rs (the agent's reconciler
/// follows it).
#[derive(Debug)]
pub struct MembershipCell {
    value: std::sync::Mutex<Option<Membership>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The record in memory is newer than the one in the store (a write failed).
    unsaved: std::sync::atomic::AtomicBool,
}

impl MembershipCell {
    /// A cell holding `value`.
    pub fn new(value: Option<Membership>) -> Arc<Self> {
        Arc::new(Self {
            value: std::sync::Mutex::new(value),
            changed: tokio::sync::watch::channel(0).0,
            unsaved: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A copy of the record.
    pub fn get(&self) -> Option<Membership> {
        self.value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the record (which the store holds too) and announces it.
    pub fn set(&self, value: Option<Membership>) {
        self.replace(value, false);
    }

    /// Replaces the record with one the store could not save, and announces it.
    pub fn set_unsaved(&self, value: Membership) {
        self.replace(Some(value), true);
    }

    /// Whether the record is newer than the store's (its write failed and must be retried).
    pub fn unsaved(&self) -> bool {
        self.unsaved.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn replace(&self, value: Option<Membership>, unsaved: bool) {
        *self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
        self.unsaved
            .store(unsaved, std::sync::atomic::Ordering::Relaxed);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes on every [`MembershipCell::set`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A change to write; a list of them is one transaction.
#[derive(Debug)]
pub enum Write<'a> {
    /// Set the membership record.
    Membership(&'a Membership),
    /// Delete the membership record.
    ClearMembership,
    /// Set the manager record (encoded by the manager module).
    Manager(&'a [u8]),
    /// Delete the manager state.
    ClearManager,
    /// Set (or with `None` delete) one of the Raft records (`manager::raft` owns their format).
    Raft(RaftKey, Option<&'a [u8]>),
    /// Delete the whole Raft log and every Raft record (`init --force-new-cluster`, `leave`).
    ClearRaft,
}

/// The Raft records kept beside the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftKey {
    /// The vote (term and whom this manager voted for).
    Vote,
    /// The last log entry purged (compacted into a snapshot).
    Purged,
    /// The last applied log entry and membership, kept with the state machine.
    Applied,
    /// The current snapshot (its meta and data).
    Snapshot,
}

impl RaftKey {
    const ALL: [RaftKey; 4] = [
        RaftKey::Vote,
        RaftKey::Purged,
        RaftKey::Applied,
        RaftKey::Snapshot,
    ];

    fn name(self) -> &'static str {
        match self {
            RaftKey::Vote => "raft_vote",
            RaftKey::Purged => "raft_purged",
            RaftKey::Applied => "raft_applied",
            RaftKey::Snapshot => "raft_snapshot",
        }
    }
}

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state dir could not be created or secured.
    #[error("cannot use state dir {path}: {source}; check the path and its permissions")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process has the store open.
    #[error("state dir {0} is in use by another shoal agent; stop it or pick another --state-dir")]
    InUse(PathBuf),
    /// The store file could not be opened (corrupt or unreadable).
    #[error("cannot open state store {path}: {source}; move it away to start this node afresh")]
    Open {
        /// The store file.
        path: PathBuf,
        /// The redb error.
        source: Box<redb::DatabaseError>,
    },
    /// A read or write failed; a failed write changed nothing.
    #[error("state store I/O failed: {0}; nothing was changed")]
    Io(Box<redb::Error>),
    /// A record did not decode.
    #[error("state store record {key:?} is corrupt: {source}; move the state dir away to start this node afresh")]
    Corrupt {
        /// The record.
        key: &'static str,
        /// The decode error.
        source: serde_json::Error,
    },
    /// The incarnation record of a node that has a key is missing or damaged: its data path
    /// cannot prove it will not repeat a nonce.
    #[error("state store record \"incarnation\" is {0}, so this node cannot start its data path without risking a repeated nonce; to recover, remove the node on a manager (`shoal node rm --force NODE`), move the state dir away and join again")]
    Incarnation(&'static str),
    /// The store's thread could not be started.
    #[error("cannot start the state store's thread: {0}")]
    Thread(std::io::Error),
    /// The store's thread has stopped (it panicked): nothing more can be read or written.
    #[error("the state store's thread has stopped (see the log above); restart the agent")]
    Stopped,
    /// The node key record is not 32 bytes.
    #[error("state store record \"node_key\" has {0} bytes, expected 32; move the state dir away to start afresh")]
    BadNodeKey(usize),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        Self::Io(Box::new(e))
    }
}

/// Work for the store's thread.
type Job = Box<dyn FnOnce(&Database) + Send>;

/// The open store. A thread of its own (`shoal-store`) owns the database and runs every read
/// and every commit, one at a time in the order they were asked for; the async methods hand it
/// the work and wait for the answer. So no fsync runs on a thread of the async runtime, where it
/// would hold up every task queued there (gossip's timers among them).
///
/// Dropping the store waits for the work already handed over, then closes the database.
pub struct Store {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`; creates `dir` with mode 0700 if missing.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DiskFaults::default()).await
    }

    /// [`Store::open`] on a slow disk: every sync takes `sync_delay` longer.
    #[cfg(test)]
    pub(crate) async fn open_slow(dir: &Path, sync_delay: Duration) -> Result<Self, StoreError> {
        let faults = DiskFaults {
            sync_delay,
            ..DiskFaults::default()
        };
        Self::open_with(dir, faults).await
    }

    /// [`Store::open`] on a disk whose syncs fail while the returned switch is on.
    #[cfg(test)]
    pub(crate) async fn open_failing(
        dir: &Path,
    ) -> Result<(Self, Arc<std::sync::atomic::AtomicBool>), StoreError> {
        let switch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let faults = DiskFaults {
            fail_syncs: Some(switch.clone()),
            ..DiskFaults::default()
        };
        Ok((Self::open_with(dir, faults).await?, switch))
    }

    async fn open_with(dir: &Path, faults: DiskFaults) -> Result<Self, StoreError> {
        let dir = dir.to_owned();
        let (opened_tx, opened) = tokio::sync::oneshot::channel();
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("shoal-store".into())
            .spawn(move || {
                let db = match open_db(&dir, faults) {
                    Ok(db) => db,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let _ = opened_tx.send(Ok(()));
                // Until every sender is gone: the store was dropped.
                for job in queue {
                    job(&db);
                }
            })
            .map_err(StoreError::Thread)?;
        let store = Self {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match opened.await {
            Ok(Ok(())) => Ok(store),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Stopped),
        }
    }

    /// Runs `job` on the store's thread, after everything asked before it. Once handed over,
    /// it runs to the end even if the caller stops waiting.
    async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Database) -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or(StoreError::Stopped)?
            .send(Box::new(move |db| {
                let _ = tx.send(job(db));
            }))
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)
    }

    /// The value of `key`.
    async fn get(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(move |db| read(db, key)).await?
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { key, source }),
        }
    }

    /// The node's X25519 static secret; `fresh` is stored and returned if there is none yet,
    /// together with a first incarnation record (see [`Store::renew_incarnation`]), in one
    /// transaction: a node that has a key always has an incarnation record.
    pub async fn node_key(&self, fresh: [u8; 32]) -> Result<[u8; 32], StoreError> {
        self.run(move |db| {
            if let Some(bytes) = read(db, NODE_KEY)? {
                return <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| StoreError::BadNodeKey(bytes.len()));
            }
            commit(db, |table| {
                table.insert(NODE_KEY, fresh.as_slice())?;
                table.insert(INCARNATION, [0u8; INCARNATION_LEN].as_slice())?;
                Ok(())
            })?;
            Ok(fresh)
        })
        .await?
    }

    /// Checks that a node with a key has a usable incarnation record (the agent refuses to
    /// start otherwise: see [`StoreError::Incarnation`]).
    pub async fn check_incarnation(&self) -> Result<(), StoreError> {
        self.run(|db| {
            if read(db, NODE_KEY)?.is_none() {
                return Ok(());
            }
            read(db, INCARNATION)?
                .ok_or(StoreError::Incarnation("missing"))
                .and_then(|v| parse_incarnation(&v))
                .map(drop)
        })
        .await?
    }

    /// Renews the data path's incarnation before a start of the data path: draws 16 bytes with
    /// `fresh` until they differ from the stored ones, stores them, and only then returns them.
    /// The incarnation goes into the data path's pair keys (see `shoal_vxlan::crypto`), so no
    /// start of this node's data path, in this process or any other, reuses a key and nonce:
    /// not after a restart, a leave and join, a removal and rejoin, nor from a copy of this state
    /// directory (each start draws its own 128 random bits).
    ///
    /// A node that has a key but no incarnation record, or a damaged one, is refused: the record
    /// must never silently start over.
    pub async fn renew_incarnation(
        &self,
        mut fresh: impl FnMut() -> [u8; INCARNATION_LEN] + Send + 'static,
    ) -> Result<[u8; INCARNATION_LEN], StoreError> {
        self.run(move |db| {
            let mut failed = None;
            let mut next = [0u8; INCARNATION_LEN];
            commit(db, |table| {
                let has_key = table.get(NODE_KEY)?.is_some();
                let current = table.get(INCARNATION)?.map(|v| v.value().to_vec());
                let current = match (current, has_key) {
                    (Some(v), _) => match parse_incarnation(&v) {
                        Ok(c) => c,
                        Err(e) => {
                            failed = Some(e);
                            return Ok(());
                        }
                    },
                    (None, true) => {
                        failed = Some(StoreError::Incarnation("missing"));
                        return Ok(());
                    }
                    (None, false) => [0u8; INCARNATION_LEN],
                };
                next = fresh();
                while next == current {
                    next = fresh();
                }
                table.insert(INCARNATION, next.as_slice())?;
                Ok(())
            })?;
            match failed {
                Some(e) => Err(e),
                None => Ok(next),
            }
        })
        .await?
    }

    /// The membership record, if this node is in a swarm.
    pub async fn membership(&self) -> Result<Option<Membership>, StoreError> {
        Ok(self
            .get_json::<MembershipRecord>(MEMBERSHIP)
            .await?
            .map(Membership::from))
    }

    /// The manager record, if this node is a manager, read by `decode` (the manager module
    /// owns that record's format; the store keeps its bytes).
    pub async fn manager<T>(
        &self,
        decode: impl FnOnce(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Option<T>, StoreError> {
        match self.get(MANAGER).await? {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    key: MANAGER,
                    source,
                }),
        }
    }

    /// Applies all `writes` in one transaction: all of them or none. Once this is called, the
    /// transaction runs to its end (commit or nothing) even if the caller stops waiting.
    pub async fn write(&self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        // Encode first: an encoding failure must not leave a half-made transaction.
        let mut encoded: Vec<(&'static str, Option<Vec<u8>>)> = Vec::with_capacity(writes.len());
        let mut clear_raft = false;
        for w in writes {
            let item = match w {
                Write::Membership(m) => (
                    MEMBERSHIP,
                    Some(to_json(MEMBERSHIP, &MembershipRecord::from(*m))?),
                ),
                Write::ClearMembership => (MEMBERSHIP, None),
                Write::Manager(bytes) => (MANAGER, Some(bytes.to_vec())),
                Write::ClearManager => (MANAGER, None),
                Write::Raft(key, value) => (key.name(), value.map(<[u8]>::to_vec)),
                Write::ClearRaft => {
                    clear_raft = true;
                    for key in RaftKey::ALL {
                        encoded.push((key.name(), None));
                    }
                    continue;
                }
            };
            encoded.push(item);
        }
        self.run(move |db| {
            commit_with_log(db, |table, log| {
                if clear_raft {
                    log.retain(|_, _| false)?;
                }
                for (key, value) in &encoded {
                    match value {
                        Some(v) => {
                            table.insert(*key, v.as_slice())?;
                        }
                        None => {
                            table.remove(*key)?;
                        }
                    }
                }
                Ok(())
            })
        })
        .await?
    }
}

/// The Raft log and its records (`manager::raft` encodes them; the store keeps bytes). Every
/// write here is one durable transaction on the store's thread: when the call returns, the
/// entries are on disk.
impl Store {
    /// A Raft record.
    pub async fn raft_get(&self, key: RaftKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key.name()).await
    }

    /// Log entries with index in `range`, in order.
    pub async fn raft_entries(
        &self,
        range: (std::ops::Bound<u64>, std::ops::Bound<u64>),
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.run(move |db| {
            read_log(db, Vec::new(), |log| {
                log.range(range)?
                    .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect()
            })
        })
        .await?
    }

    /// The last log entry, if any.
    pub async fn raft_last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.run(move |db| {
            read_log(db, None, |log| {
                Ok(log.last()?.map(|(k, v)| (k.value(), v.value().to_vec())))
            })
        })
        .await?
    }

    /// Appends (or overwrites) `entries`, durably, in one transaction.
    pub async fn raft_append(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StoreError> {
        self.run(move |db| {
            commit_with_log(db, |_, log| {
                for (index, bytes) in &entries {
                    log.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
        })
        .await?
    }

    /// Deletes the entries from index `from` on (a conflicting suffix).
    pub async fn raft_truncate(&self, from: u64) -> Result<(), StoreError> {
        self.run(move |db| commit_with_log(db, |_, log| log.retain_in(from.., |_, _| false)))
            .await?
    }

    /// Deletes the entries up to index `upto` and records `purged` as the last one purged.
    pub async fn raft_purge(&self, upto: u64, purged: Vec<u8>) -> Result<(), StoreError> {
        self.run(move |db| {
            commit_with_log(db, |table, log| {
                table.insert(RaftKey::Purged.name(), purged.as_slice())?;
                log.retain_in(..=upto, |_, _| false)
            })
        })
        .await?
    }
}

/// The attachments of containers to user networks: one record per key, each write durable
/// before the call returns.
impl Store {
    /// Every attachment record, by key.
    pub async fn attachments(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(move |db| -> Result<_, StoreError> {
            let tx = db.begin_read().map_err(redb::Error::from)?;
            let table = match tx.open_table(ATTACHMENTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(redb::Error::from(e).into()),
            };
            let rows: Result<Vec<_>, redb::StorageError> = table
                .iter()
                .map_err(redb::Error::from)?
                .map(|item| item.map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
                .collect();
            Ok(rows.map_err(redb::Error::from)?)
        })
        .await?
    }

    /// Sets (or with `None` deletes) the attachment record `key`.
    pub async fn put_attachment(
        &self,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        self.run(move |db| -> Result<(), StoreError> {
            let tx = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut table = tx.open_table(ATTACHMENTS).map_err(redb::Error::from)?;
                match &value {
                    Some(v) => {
                        table
                            .insert(key.as_str(), v.as_slice())
                            .map_err(redb::Error::from)?;
                    }
                    None => {
                        table.remove(key.as_str()).map_err(redb::Error::from)?;
                    }
                }
            }
            tx.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await?
    }
}

/// Makes `dir` (mode 0700) and opens the database in it (mode 0600).
fn open_db(dir: &Path, faults: DiskFaults) -> Result<Database, StoreError> {
    let dir_err = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    set_mode(dir, 0o700).map_err(dir_err)?;
    let path = dir.join(FILE_NAME);
    let db = match Disk::open(&path, faults) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::InUse(dir.to_owned()))
        }
        Err(source) => {
            return Err(StoreError::Open {
                path,
                source: Box::new(source),
            })
        }
    };
    set_mode(&path, 0o600).map_err(dir_err)?;
    Ok(db)
}

/// The value of `key` (on the store's thread).
fn read(db: &Database, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = match tx.open_table(TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(redb::Error::from(e).into()),
    };
    let value = table.get(key).map_err(redb::Error::from)?;
    Ok(value.map(|v| v.value().to_vec()))
}

/// One write transaction with `f` (on the store's thread): all of it or nothing.
fn commit(
    db: &Database,
    f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>) -> Result<(), redb::StorageError>,
) -> Result<(), StoreError> {
    commit_with_log(db, |table, _| f(table))
}

/// [`commit`] with the Raft log table as well, in the same transaction.
fn commit_with_log(
    db: &Database,
    f: impl FnOnce(
        &mut redb::Table<'_, &str, &[u8]>,
        &mut redb::Table<'_, u64, &[u8]>,
    ) -> Result<(), redb::StorageError>,
) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(TABLE).map_err(redb::Error::from)?;
        let mut log = tx.open_table(RAFT_LOG).map_err(redb::Error::from)?;
        f(&mut table, &mut log).map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

/// `f` over the Raft log (on the store's thread); `empty` if there has never been one.
fn read_log<T>(
    db: &Database,
    empty: T,
    f: impl FnOnce(&redb::ReadOnlyTable<u64, &[u8]>) -> Result<T, redb::StorageError>,
) -> Result<T, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let log = match tx.open_table(RAFT_LOG) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(empty),
        Err(e) => return Err(redb::Error::from(e).into()),
    };
    Ok(f(&log).map_err(redb::Error::from)?)
}

/// Faults a test can give the store's disk (none otherwise).
#[derive(Debug, Default)]
struct DiskFaults {
    /// Added to every sync: a slow disk.
    sync_delay: Duration,
    /// While on, every sync fails.
    fail_syncs: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// The store's file under redb, with faults for tests.
#[derive(Debug)]
struct Disk {
    file: redb::backends::FileBackend,
    faults: DiskFaults,
}

impl Disk {
    /// Opens (or creates) the database at `path`, as `Database::create` does.
    fn open(path: &Path, faults: DiskFaults) -> Result<Database, redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let file = redb::backends::FileBackend::new(file)?;
        Database::builder().create_with_backend(Disk { file, faults })
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.file.read(offset, len)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        // Only the store's own thread commits: never a thread of an async runtime, where an
        // fsync would hold up every task queued there. (On the store's thread, a panic here
        // stops the store: every call then fails with `Stopped`.)
        if cfg!(any(test, debug_assertions)) {
            assert!(
                tokio::runtime::Handle::try_current().is_err(),
                "a state store commit on a thread of the async runtime"
            );
        }
        if !self.faults.sync_delay.is_zero() {
            std::thread::sleep(self.faults.sync_delay);
        }
        if let Some(fail) = &self.faults.fail_syncs {
            if fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::other("injected sync failure"));
            }
        }
        self.file.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write(offset, data)
    }
}

/// A record another part encoded (`Write::Manager`), or the error saying which one failed.
pub fn encoded(
    key: &'static str,
    record: Result<Vec<u8>, serde_json::Error>,
) -> Result<Vec<u8>, StoreError> {
    record.map_err(|source| StoreError::Corrupt { key, source })
}

fn to_json<T: Serialize>(key: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Corrupt { key, source })
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::state::tests::{init_cmd, node};
    use crate::manager::state::{Command, State};

    fn membership(state: &State) -> Membership {
        Membership {
            node_id: crate::manager::state::tests::id(1),
            cert_der: vec![9; 10],
            key_pem: "pem".into(),
            cert_not_after: 0,
            view: state.view().unwrap(),
            listen_addr: None,
        }
    }

    impl Store {
        /// One write transaction with `f`, as it is.
        async fn transact(
            &self,
            f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>) -> Result<(), redb::StorageError>
                + Send
                + 'static,
        ) -> Result<(), StoreError> {
            self.run(move |db| commit(db, f)).await?
        }
    }

    fn sample_state() -> State {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        s
    }

    #[tokio::test]
    async fn records_are_versioned_and_an_unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let state = sample_state();
        let m = membership(&state);
        store
            .write(&[
                Write::Membership(&m),
                Write::Manager(&state.to_record().unwrap()),
            ])
            .await
            .unwrap();
        // On disk: the record's own format, with the view inside in its wire form.
        let raw = store.get(MEMBERSHIP).await.unwrap().unwrap();
        let raw: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert!(raw["v1"]["view"]["v1"]["nodes"].is_array(), "{raw}");
        let raw = store.get(MANAGER).await.unwrap().unwrap();
        let raw: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert!(raw["v1"]["cluster"].is_object(), "{raw}");
        assert_eq!(store.membership().await.unwrap(), Some(m));
        assert_eq!(
            store.manager(State::from_record).await.unwrap(),
            Some(state)
        );
        // Records of a format this build does not read (a later one, or the unversioned one of
        // older agents) are refused with their name, never half-read.
        for (key, bytes) in [
            (MEMBERSHIP, &br#"{"v2":{}}"#[..]),
            (MANAGER, &br#"{"version":3,"cluster":null}"#[..]),
        ] {
            store
                .transact(move |t| t.insert(key, bytes).map(drop))
                .await
                .unwrap();
            let err = if key == MEMBERSHIP {
                store.membership().await.unwrap_err()
            } else {
                store.manager(State::from_record).await.unwrap_err()
            };
            let err = err.to_string();
            assert!(err.contains(&format!("{key:?}")), "{err}");
        }
    }

    #[tokio::test]
    async fn attachment_records_are_kept_one_each_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert!(store.attachments().await.unwrap().is_empty());
        store
            .put_attachment("web/a/eth0".into(), Some(b"one".to_vec()))
            .await
            .unwrap();
        store
            .put_attachment("web/b/eth0".into(), Some(b"two".to_vec()))
            .await
            .unwrap();
        store
            .put_attachment("web/a/eth0".into(), None)
            .await
            .unwrap();
        // Deleting what is not there is not an error.
        store
            .put_attachment("web/zz/eth0".into(), None)
            .await
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(
            store.attachments().await.unwrap(),
            vec![("web/b/eth0".to_owned(), b"two".to_vec())]
        );
    }

    #[tokio::test]
    async fn empty_store_has_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.membership().await.unwrap(), None);
        assert_eq!(store.manager(State::from_record).await.unwrap(), None);
    }

    /// The Raft log survives a reopen; `ClearRaft` (a leave, a demotion, a fresh init) takes
    /// the whole log and every Raft record, and nothing else.
    #[tokio::test]
    async fn the_raft_log_is_kept_and_cleared_whole() {
        use std::ops::Bound::{Included, Unbounded};
        let dir = tempfile::tempdir().unwrap();
        let state = sample_state();
        {
            let store = Store::open(dir.path()).await.unwrap();
            let entries = (1..=5).map(|i| (i, vec![i as u8])).collect();
            store.raft_append(entries).await.unwrap();
            store
                .write(&[
                    Write::Raft(RaftKey::Vote, Some(b"vote")),
                    Write::Manager(&state.to_record().unwrap()),
                ])
                .await
                .unwrap();
            store.raft_truncate(5).await.unwrap();
            store.raft_purge(1, b"purged".to_vec()).await.unwrap();
        }
        let store = Store::open(dir.path()).await.unwrap();
        let all = store.raft_entries((Unbounded, Unbounded)).await.unwrap();
        assert_eq!(all, vec![(2, vec![2]), (3, vec![3]), (4, vec![4])]);
        let some = store.raft_entries((Included(3), Unbounded)).await.unwrap();
        assert_eq!(some.len(), 2);
        assert_eq!(store.raft_last().await.unwrap(), Some((4, vec![4])));
        assert_eq!(
            store.raft_get(RaftKey::Vote).await.unwrap().unwrap(),
            b"vote"
        );
        assert_eq!(
            store.raft_get(RaftKey::Purged).await.unwrap().unwrap(),
            b"purged"
        );
        store.write(&[Write::ClearRaft]).await.unwrap();
        assert_eq!(store.raft_last().await.unwrap(), None);
        for key in RaftKey::ALL {
            assert_eq!(store.raft_get(key).await.unwrap(), None, "{key:?}");
        }
        assert_eq!(
            store.manager(State::from_record).await.unwrap(),
            Some(state)
        );
    }

    #[tokio::test]
    async fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample_state();
        let m = membership(&state);
        {
            let store = Store::open(dir.path()).await.unwrap();
            assert_eq!(store.node_key([5; 32]).await.unwrap(), [5; 32]);
            store
                .write(&[
                    Write::Membership(&m),
                    Write::Manager(&state.to_record().unwrap()),
                ])
                .await
                .unwrap();
        }
        let store = Store::open(dir.path()).await.unwrap();
        // The first key stays; a new candidate is ignored.
        assert_eq!(store.node_key([6; 32]).await.unwrap(), [5; 32]);
        assert_eq!(store.membership().await.unwrap(), Some(m.clone()));
        assert_eq!(
            store.manager(State::from_record).await.unwrap(),
            Some(state)
        );
        assert_eq!(m.role(), Role::Manager);
        store
            .write(&[Write::ClearMembership, Write::ClearManager])
            .await
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.membership().await.unwrap(), None);
        assert_eq!(store.manager(State::from_record).await.unwrap(), None);
        assert_eq!(store.node_key([7; 32]).await.unwrap(), [5; 32]);
    }

    #[tokio::test]
    async fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).await.unwrap();
        match Store::open(dir.path()).await {
            Err(StoreError::InUse(p)) => assert_eq!(p, dir.path()),
            other => panic!("expected InUse, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            b"not a database at all, just text",
        )
        .unwrap();
        let err = Store::open(dir.path()).await.unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("move it away"));
    }

    #[tokio::test]
    async fn corrupt_record_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store
            .transact(|t| {
                t.insert(MEMBERSHIP, b"{not json".as_slice())?;
                t.insert(NODE_KEY, b"short".as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(
            store.membership().await,
            Err(StoreError::Corrupt {
                key: MEMBERSHIP,
                ..
            })
        ));
        assert!(matches!(
            store.node_key([0; 32]).await,
            Err(StoreError::BadNodeKey(5))
        ));
    }

    #[tokio::test]
    async fn incarnation_is_renewed_stored_and_never_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let mut draws = (1u8..).map(|n| [n; INCARNATION_LEN]);
        let first;
        {
            let store = Store::open(dir.path()).await.unwrap();
            store.node_key([5; 32]).await.unwrap();
            store.check_incarnation().await.unwrap();
            first = store
                .renew_incarnation(move || draws.next().unwrap())
                .await
                .unwrap();
            assert_eq!(first, [1; INCARNATION_LEN]);
        }
        // Reopened (a restart): the stored one is not drawn again, even if the source repeats.
        let store = Store::open(dir.path()).await.unwrap();
        let mut again = [
            [1u8; INCARNATION_LEN],
            [1; INCARNATION_LEN],
            [9; INCARNATION_LEN],
        ]
        .into_iter();
        assert_eq!(
            store
                .renew_incarnation(move || again.next().unwrap())
                .await
                .unwrap(),
            [9; INCARNATION_LEN]
        );
        assert_eq!(
            parse_incarnation(&store.get(INCARNATION).await.unwrap().unwrap()).unwrap(),
            [9; INCARNATION_LEN],
            "stored before it was returned"
        );
    }

    #[tokio::test]
    async fn missing_or_damaged_incarnation_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        // No key yet: nothing to protect.
        store.check_incarnation().await.unwrap();
        store.node_key([5; 32]).await.unwrap();
        store
            .transact(|t| {
                t.remove(INCARNATION)?;
                Ok(())
            })
            .await
            .unwrap();
        for err in [
            store.check_incarnation().await.unwrap_err(),
            store
                .renew_incarnation(|| [1; INCARNATION_LEN])
                .await
                .unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::Incarnation("missing")), "{err:?}");
            let line = err.to_string();
            assert!(
                line.contains("node rm --force") && !line.contains('\n'),
                "{line}"
            );
        }
        assert!(
            store.get(INCARNATION).await.unwrap().is_none(),
            "never silently 0"
        );
        store
            .transact(|t| {
                t.insert(INCARNATION, b"xyz".as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(
            store.renew_incarnation(|| [1; INCARNATION_LEN]).await,
            Err(StoreError::Incarnation("damaged"))
        ));
        // The four-byte counter of earlier agents is a valid record.
        store
            .transact(|t| {
                t.insert(INCARNATION, 7u32.to_be_bytes().as_slice())?;
                Ok(())
            })
            .await
            .unwrap();
        store.check_incarnation().await.unwrap();
        assert_eq!(
            store
                .renew_incarnation(|| [3; INCARNATION_LEN])
                .await
                .unwrap(),
            [3; INCARNATION_LEN]
        );
    }

    /// Commits asked for from the agent's runtime (two workers) run on the store's thread:
    /// `Disk::sync_data` checks every sync it makes, and one on a runtime thread would panic
    /// there (then the store stops and answers `Stopped`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_run_on_the_stores_thread_not_the_runtimes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let state = sample_state();
        let m = membership(&state);
        store.node_key([5; 32]).await.unwrap();
        store
            .renew_incarnation(|| [4; INCARNATION_LEN])
            .await
            .unwrap();
        store
            .write(&[
                Write::Membership(&m),
                Write::Manager(&state.to_record().unwrap()),
            ])
            .await
            .unwrap();
        assert_eq!(store.membership().await.unwrap(), Some(m));
        // The check itself: a commit made here, on a runtime thread, is caught.
        let caught = std::panic::catch_unwind(|| {
            let db = Disk::open(&dir.path().join("other.redb"), DiskFaults::default()).unwrap();
            commit(&db, |t| {
                t.insert(NODE_KEY, [1u8; 32].as_slice())?;
                Ok(())
            })
        });
        assert!(
            caught.is_err(),
            "a commit on a runtime thread went unnoticed"
        );
    }

    /// A child process (this same test binary) writes a committed state, then starts a
    /// second write and aborts the process before commit. The reopened store must hold
    /// exactly the committed state.
    #[tokio::test]
    async fn crash_before_commit_keeps_old_state() {
        const ENV: &str = "SHOAL_STORE_CRASH_DIR";
        if let Ok(dir) = std::env::var(ENV) {
            let store = Store::open(Path::new(&dir)).await.unwrap();
            let state = sample_state();
            store
                .write(&[Write::Manager(&state.to_record().unwrap())])
                .await
                .unwrap();
            let mut bigger = state.clone();
            bigger
                .apply(Command::AddNode(Box::new(node(2, Role::Worker))))
                .unwrap();
            store
                .run(move |db| {
                    let tx = db.begin_write().unwrap();
                    {
                        let mut t = tx.open_table(TABLE).unwrap();
                        let json = serde_json::to_vec(&bigger).unwrap();
                        t.insert(MANAGER, json.as_slice()).unwrap();
                        t.insert(MEMBERSHIP, b"half".as_slice()).unwrap();
                    }
                    // Crash with the transaction open: no destructors, no commit.
                    std::process::abort();
                })
                .await
                .unwrap();
            unreachable!("the child aborted");
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "store::tests::crash_before_commit_keeps_old_state",
                "--nocapture",
            ])
            .env(ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child must have crashed");
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(
            store.manager(State::from_record).await.unwrap(),
            Some(sample_state())
        );
        assert_eq!(store.membership().await.unwrap(), None);
    }
}
