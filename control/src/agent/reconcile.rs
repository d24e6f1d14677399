//! The one owner of what this node runs: its role (on a manager, its part of the Raft group and
//! the API; on a worker, the watch stream to a manager), gossip, and the data path. A
//! promotion starts the manager, a demotion stops it (and clears its Raft log and state).
//!
//! One task, the [`Reconciler`], holds all of it. It is fed by events and never shares what
//! it holds behind a lock:
//! - **orders** from the agent's lifecycle requests ([`Order::Start`] after `init`, `join` or
//!   a restart; [`Order::Stop`] for `leave` and shutdown; [`Order::ForceNewCluster`]);
//! - **the membership record** changing (a new view from the watch stream or this node's own
//!   manager, a renewed certificate): gossip's admission, keys and metadata and the data
//!   path's peers and epochs follow it;
//! - **gossip**: what peers announce of themselves (public key, incarnation) reaches the data
//!   path; the set of nodes gossip sees up reaches the manager (node STATUS);
//! - **timers**: a new gossip key or data-path epoch starts sealing, a failed start is
//!   retried, the data path's drops are summed up in the log.
//!
//! What runs is published as a [`Running`] snapshot on every change; requests (`info`,
//! `network inspect`, `capture`, `/metrics`, admin calls) read the latest snapshot.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use shoal_vxlan::crypto::Incarnation;

use super::datapath::{self, DataPath};
use super::gossip::Link;
use super::{watch_loop, AgentError, Faults};
use crate::cluster::LiveKeys;
use crate::id::NodeId;
use crate::manager::state::{Command, Role, State};
use crate::manager::Manager;
use crate::store::{Membership, MembershipCell, RaftKey, Store, Write};
use crate::trust::tls::{server_config, Issued};

/// How often gossip that could not start is tried again.
const GOSSIP_RETRY: Duration = Duration::from_secs(5);
/// How often a data path that could not start is tried again.
const DATA_PATH_RETRY: Duration = Duration::from_secs(5);
/// How long a demoted manager stays in the Raft group at most, waiting to be taken out.
const DEMOTION_GRACE: Duration = Duration::from_secs(10);
/// A demoted manager no leader has sent anything for this long has been taken out.
const LEADER_GONE: Duration = Duration::from_secs(2);
/// How often a demoted manager looks whether it has been taken out.
const ROLE_RECHECK: Duration = Duration::from_millis(200);
/// Orders waiting for the reconciler at most.
const ORDER_QUEUE: usize = 8;

/// What runs on this node now, as requests see it.
#[derive(Clone, Default)]
pub struct Running {
    /// This node's manager, when it leads.
    pub manager: Option<Arc<Manager>>,
    /// The gossip driver, once gossip runs.
    pub gossip: Option<shoal_gossip::driver::Handle>,
    /// The gossip keys live on this node.
    pub gossip_keys: Option<LiveKeys>,
    /// The data path, once it runs.
    pub data_path: Option<Arc<DataPath>>,
}

/// The manager's part of a start: its state and the listener already bound to its address
/// (bound by the caller, so a busy port is the caller's error before anything is kept).
pub struct ManagerStart {
    /// The manager state (empty on a manager that has just joined).
    pub state: State,
    /// The bound API listener.
    pub listener: TcpListener,
    /// Its address.
    pub listen: SocketAddr,
    /// This manager's Raft ID.
    pub raft_id: u64,
    /// Form a new Raft group of one if there is no Raft log (`init`, a state from before Raft).
    pub bootstrap: bool,
    /// A command to commit once it runs (`init`'s).
    pub first: Option<Command>,
}

/// A [`ManagerStart`] for the manager of membership `m` from what the store holds, with its
/// API bound to `listen`. A state with no Raft record beside it (a state dir from before Raft)
/// forms a group of one, its state the first; an empty one (a manager that just joined or was
/// promoted) waits for the leader.
pub async fn manager_start(
    store: &Store,
    m: &Membership,
    listen: SocketAddr,
) -> Result<ManagerStart, AgentError> {
    let state = store.manager(State::from_record).await?.unwrap_or_default();
    let bootstrap = state.cluster().is_some() && store.raft_get(RaftKey::Applied).await?.is_none();
    let raft_id = state
        .cluster()
        .and_then(|c| c.nodes.get(&m.node_id))
        .and_then(|n| n.raft_id)
        .or_else(|| m.view.node(&m.node_id).and_then(|n| n.raft_id))
        .ok_or(AgentError::NoRaftId)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: listen,
            source,
        })?;
    Ok(ManagerStart {
        state,
        listener,
        listen,
        raft_id,
        bootstrap,
        first: None,
    })
}

/// Where this node's manager API listens: the address it was given (`init`, `join`), or the
/// one its node record advertises.
fn listen_addr(m: &Membership) -> Option<SocketAddr> {
    m.listen_addr
        .or_else(|| m.view.node(&m.node_id).and_then(|n| n.api_addr))
}

/// What the agent asks of the reconciler.
pub enum Order {
    /// Run this node's part in the swarm of the membership record: the manager (when
    /// `manager` is given) or the watch stream, then gossip and the data path with
    /// `incarnation`, which must be fresh (stored before, never used before).
    Start {
        /// The manager's state and listener, on the leader.
        manager: Option<Box<ManagerStart>>,
        /// A fresh incarnation.
        incarnation: Incarnation,
        /// Whether the manager started.
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// `init --force-new-cluster`: this node's manager stops, and starts again alone in a new
    /// Raft group from the state it had (see [`crate::manager::forced_state`]); gossip and
    /// the data path go on.
    ForceNewCluster {
        /// The managers demoted, once the new group runs.
        reply: oneshot::Sender<Result<Vec<NodeId>, AgentError>>,
    },
    /// Stop everything this node runs; gossip says goodbye first.
    Stop {
        /// Answered once everything has stopped.
        reply: oneshot::Sender<()>,
    },
}

/// The agent's side of the reconciler: sends orders, reads what runs.
#[derive(Clone)]
pub struct Handle {
    orders: mpsc::Sender<Order>,
    running: watch::Receiver<Arc<Running>>,
}

impl Handle {
    /// What runs now.
    pub fn running(&self) -> Arc<Running> {
        self.running.borrow().clone()
    }

    /// See [`Order::Start`].
    pub async fn start(
        &self,
        manager: Option<ManagerStart>,
        incarnation: Incarnation,
    ) -> Result<(), AgentError> {
        let (reply, answer) = oneshot::channel();
        let order = Order::Start {
            manager: manager.map(Box::new),
            incarnation,
            reply,
        };
        if self.orders.send(order).await.is_err() {
            return Err(AgentError::Stopped);
        }
        answer.await.unwrap_or(Err(AgentError::Stopped))
    }

    /// See [`Order::ForceNewCluster`].
    pub async fn force_new_cluster(&self) -> Result<Vec<NodeId>, AgentError> {
        let (reply, answer) = oneshot::channel();
        if self
            .orders
            .send(Order::ForceNewCluster { reply })
            .await
            .is_err()
        {
            return Err(AgentError::Stopped);
        }
        answer.await.unwrap_or(Err(AgentError::Stopped))
    }

    /// See [`Order::Stop`].
    pub async fn stop(&self) {
        let (reply, answer) = oneshot::channel();
        if self.orders.send(Order::Stop { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }
}

/// What the reconciler needs to start things, fixed for the agent's life.
pub struct Setup {
    /// The state store.
    pub store: Arc<Store>,
    /// The membership record (and its changes).
    pub membership: Arc<MembershipCell>,
    /// Where faults are counted.
    pub faults: Arc<Faults>,
    /// The node's X25519 secret.
    pub node_secret: zeroize::Zeroizing<[u8; 32]>,
    /// Gossip's bind address, if not the default.
    pub gossip_addr: Option<SocketAddr>,
    /// The data path's parameters, if this node runs one.
    pub data_path: Option<datapath::Params>,
    /// Containers attached to user networks (the data path carries their networks).
    pub endpoints: Arc<super::cni::Endpoints>,
}

/// A background task with a stop signal.
struct Task {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Task {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Gossip while it runs, with the receivers the reconciler waits on.
struct Gossip {
    link: Link,
    announced: watch::Receiver<Arc<std::collections::HashMap<NodeId, datapath::Announced>>>,
    up: watch::Receiver<Arc<HashSet<NodeId>>>,
    entries: watch::Receiver<u64>,
}

/// The task that owns what this node runs. See the module docs.
pub struct Reconciler {
    setup: Setup,
    manager: Option<(Arc<Manager>, Task)>,
    watcher: Option<Task>,
    /// The incarnation of the current start (`None`: nothing should run).
    incarnation: Option<Incarnation>,
    gossip: Option<Gossip>,
    gossip_retry: Option<Instant>,
    /// When this manager learnt it was demoted (or left): it keeps its part in the Raft group
    /// until the others have taken it out, at most [`DEMOTION_GRACE`].
    demoted_at: Option<Instant>,
    /// When to look at the role again (a demoted manager still in the Raft group).
    role_wake: Option<Instant>,
    gossip_warned: bool,
    data_path: Option<Arc<DataPath>>,
    data_path_wake: Option<Instant>,
    data_path_warned: bool,
    drops: Option<(Arc<DataPath>, shoal_vxlan::engine::DropCounts)>,
    published: watch::Sender<Arc<Running>>,
}

/// Starts the reconciler task; it ends when every [`Handle`] is gone (after stopping what
/// runs).
pub fn spawn(setup: Setup) -> Handle {
    let (orders, rx) = mpsc::channel(ORDER_QUEUE);
    let (published, running) = watch::channel(Arc::new(Running::default()));
    let reconciler = Reconciler {
        setup,
        manager: None,
        watcher: None,
        incarnation: None,
        gossip: None,
        gossip_retry: None,
        gossip_warned: false,
        data_path: None,
        data_path_wake: None,
        demoted_at: None,
        role_wake: None,
        data_path_warned: false,
        drops: None,
        published,
    };
    tokio::spawn(reconciler.run(rx));
    Handle { orders, running }
}

/// Waits for a change on `rx`; forever when there is none to wait on (or it closed).
async fn changed<T>(rx: Option<&mut watch::Receiver<T>>) {
    if let Some(rx) = rx {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

impl Reconciler {
    async fn run(mut self, mut orders: mpsc::Receiver<Order>) {
        let mut record = self.setup.membership.subscribe();
        let mut drops = tokio::time::interval(datapath::DROP_SUMMARY_INTERVAL);
        drops.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self
                .next_wake()
                .map_or_else(far, tokio::time::Instant::from_std);
            let (announced, up, entries) = match self.gossip.as_mut() {
                Some(g) => (
                    Some(&mut g.announced),
                    Some(&mut g.up),
                    Some(&mut g.entries),
                ),
                None => (None, None, None),
            };
            tokio::select! {
                order = orders.recv() => match order {
                    Some(Order::Start { manager, incarnation, reply }) => {
                        let _ = reply.send(self.start(manager, incarnation).await);
                    }
                    Some(Order::ForceNewCluster { reply }) => {
                        let _ = reply.send(self.force_new_cluster().await);
                    }
                    Some(Order::Stop { reply }) => {
                        self.stop().await;
                        let _ = reply.send(());
                    }
                    None => break,
                },
                changed = record.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.follow_record().await;
                }
                () = changed(announced) => self.steer_data_path(),
                () = changed(entries) => self.steer_data_path(),
                () = changed(up) => {
                    self.feed_manager();
                    // A backend's node going down takes it out of the mesh at once.
                    self.steer_data_path();
                }
                () = tokio::time::sleep_until(wake) => self.on_timer().await,
                _ = drops.tick() => self.log_drops(),
            }
        }
        self.stop().await;
    }

    /// The soonest of: gossip's next start try, a new gossip key sealing, the data path's
    /// next epoch switch or start try.
    fn next_wake(&self) -> Option<Instant> {
        let key_switch = self.gossip.as_ref().and_then(|g| g.link.key_switch_at());
        [
            self.gossip_retry,
            key_switch,
            self.data_path_wake,
            self.role_wake,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn start(
        &mut self,
        manager: Option<Box<ManagerStart>>,
        incarnation: Incarnation,
    ) -> Result<(), AgentError> {
        let m = self.setup.membership.get().ok_or(AgentError::NotInSwarm)?;
        self.stop().await;
        match manager {
            Some(start) => {
                let first = start.first.clone();
                let (manager, task) = self.start_manager(&m, *start).await?;
                self.manager = Some((manager.clone(), task));
                if let Some(command) = first {
                    if let Err(e) = manager.apply(command).await {
                        self.stop().await;
                        return Err(AgentError::Manager(e.to_string()));
                    }
                }
            }
            None => self.watcher = Some(self.start_watcher()),
        }
        self.incarnation = Some(incarnation);
        self.gossip_retry = Some(Instant::now());
        // What started may not be what the view says any more (a manager demoted while it was
        // down): follow the view now, not at its next change.
        self.follow_role(&m).await;
        self.on_timer().await;
        Ok(())
    }

    async fn stop(&mut self) {
        self.incarnation = None;
        self.gossip_retry = None;
        self.data_path_wake = None;
        if let Some((manager, _)) = &self.manager {
            manager.set_gossip_up(None);
        }
        // The data path goes with its gossip (its peers' keys come from there).
        self.data_path = None;
        self.drops = None;
        if let Some(g) = self.gossip.take() {
            g.link.stop(true).await;
        }
        if let Some((manager, task)) = self.manager.take() {
            task.stop().await;
            manager.shutdown().await;
        }
        if let Some(task) = self.watcher.take() {
            task.stop().await;
        }
        self.publish();
    }

    /// See [`Order::ForceNewCluster`]. On error the manager starts again as it was.
    async fn force_new_cluster(&mut self) -> Result<Vec<NodeId>, AgentError> {
        let m = self.setup.membership.get().ok_or(AgentError::NotInSwarm)?;
        if self.incarnation.is_none() {
            return Err(AgentError::Stopped);
        }
        // The old group's manager first: nothing more goes into its log or state.
        if let Some((manager, task)) = self.manager.take() {
            task.stop().await;
            manager.shutdown().await;
        }
        self.demoted_at = None;
        let forced = self.start_forced(&m).await;
        if forced.is_err() {
            self.follow_role(&m).await;
        }
        self.publish();
        forced
    }

    async fn start_forced(&mut self, m: &Membership) -> Result<Vec<NodeId>, AgentError> {
        let store = &self.setup.store;
        let (state, demoted) = crate::manager::forced_state(store, &m.node_id)
            .await
            .map_err(|e| AgentError::Force(e.to_string()))?;
        let view = state
            .view()
            .ok_or_else(|| AgentError::Force("this manager has no state".into()))?;
        let next = Membership { view, ..m.clone() };
        let record = crate::store::encoded("manager", state.to_record())?;
        // One transaction: the old group's log goes with the state it made, so a crash leaves
        // either the old manager or the new group's first state (which forms a group of one).
        store
            .write(&[
                Write::ClearRaft,
                Write::Manager(&record),
                Write::Membership(&next),
            ])
            .await?;
        self.setup.membership.set(Some(next.clone()));
        let listen = listen_addr(&next).ok_or(AgentError::NoRaftId)?;
        let start = manager_start(store, &next, listen).await?;
        let running = self.start_manager(&next, start).await?;
        self.manager = Some(running);
        self.feed_manager();
        info!(
            demoted = demoted.len(),
            "forced a new cluster: this manager alone forms the managers' Raft group"
        );
        Ok(demoted)
    }

    async fn start_manager(
        &self,
        m: &Membership,
        start: ManagerStart,
    ) -> Result<(Arc<Manager>, Task), AgentError> {
        let own = Issued {
            cert_der: m.cert_der.clone(),
            key_pem: m.key_pem.clone(),
        };
        let tls = server_config(&m.view.ca_cert_der, &own)?;
        let manager = Manager::start(
            m.node_id.clone(),
            start.raft_id,
            start.listen,
            (own, m.cert_not_after),
            *self.setup.node_secret,
            start.state,
            self.setup.store.clone(),
            self.setup.membership.clone(),
            start.bootstrap,
        )
        .await?;
        let (endpoints, membership) = (self.setup.endpoints.clone(), self.setup.membership.clone());
        manager.set_endpoint_count(Arc::new(move |net| {
            membership
                .get()
                .map_or(0, |m| endpoints.count(&m.view, &m.node_id, net))
        }));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(
            manager
                .clone()
                .serve(start.listener, TlsAcceptor::from(tls), rx),
        );
        Ok((manager, Task { stop, task }))
    }

    fn start_watcher(&self) -> Task {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(watch_loop(
            self.setup.store.clone(),
            self.setup.membership.clone(),
            self.setup.faults.clone(),
            rx,
        ));
        Task { stop, task }
    }

    /// Tries to start gossip (retried every [`GOSSIP_RETRY`]: the advertise address may not
    /// be up yet).
    async fn start_gossip(&mut self) {
        let (Some(incarnation), Some(m)) = (self.incarnation, self.setup.membership.get()) else {
            self.gossip_retry = None;
            return;
        };
        let started = Link::start(
            &m,
            &self.setup.node_secret,
            incarnation,
            self.setup.gossip_addr,
            self.setup.endpoints.clone(),
        )
        .await;
        match started {
            Ok(link) => {
                if self.gossip_warned {
                    info!("gossip started after all");
                }
                self.gossip_retry = None;
                self.gossip_warned = false;
                self.gossip = Some(Gossip {
                    announced: link.watch_announced(),
                    up: link.watch_up(),
                    entries: link.watch_entries(),
                    link,
                });
                self.feed_manager();
                self.steer_data_path();
            }
            Err(e) => {
                if !self.gossip_warned {
                    warn!("gossip did not start: {e}; retrying every 5 s, and node STATUS falls back to the watch streams meanwhile");
                    self.gossip_warned = true;
                }
                self.gossip_retry = Some(Instant::now() + GOSSIP_RETRY);
            }
        }
        self.publish();
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.gossip.is_none() && self.gossip_retry.is_some_and(|t| t <= now) {
            self.start_gossip().await;
        }
        let key_switch = self.gossip.as_ref().and_then(|g| g.link.key_switch_at());
        if key_switch.is_some_and(|t| t <= now) {
            if let (Some(g), Some(m)) = (self.gossip.as_mut(), self.setup.membership.get()) {
                if let Err(e) = g.link.refresh_keys(&m.view) {
                    warn!("gossip could not switch keys: {e}");
                }
            }
            self.publish();
        }
        if self.role_wake.is_some_and(|t| t <= now) {
            self.role_wake = None;
            if let Some(m) = self.setup.membership.get() {
                self.follow_role(&m).await;
            }
        }
        if self.data_path_wake.is_some_and(|t| t <= now) {
            self.steer_data_path();
        }
    }

    /// The membership record changed: gossip and the data path follow it. Without one (the
    /// node left, or the manager removed it), nothing runs.
    async fn follow_record(&mut self) {
        let Some(m) = self.setup.membership.get() else {
            if self.incarnation.is_some() || self.manager.is_some() || self.watcher.is_some() {
                self.stop().await;
            }
            return;
        };
        if self.incarnation.is_some() {
            self.follow_role(&m).await;
        }
        if let Some(g) = self.gossip.as_mut() {
            if let Err(e) = g.link.apply_view(&m).await {
                warn!("gossip could not follow the cluster view: {e}");
            }
        }
        self.steer_data_path();
        self.publish();
    }

    /// A promotion starts this node's manager (the leader adds it to the Raft group); a
    /// demotion (or a leave the managers applied) stops it, clears its Raft log and state, and
    /// the node follows a manager's watch stream like any worker.
    async fn follow_role(&mut self, m: &Membership) {
        let own = m.view.node(&m.node_id);
        // A manager once the view says so and this node holds the certificate the view names
        // (the manager certificate arrives on the watch stream just after the view).
        let holds_cert =
            own.is_some_and(|n| n.cert_digest == crate::trust::tls::cert_digest(&m.cert_der));
        let manager = holds_cert
            && own.is_some_and(|n| n.role == Role::Manager && n.active() && n.raft_id.is_some());
        match (manager, self.manager.is_some()) {
            (true, false) => {
                let Some(listen) = listen_addr(m) else {
                    return;
                };
                let started = match manager_start(&self.setup.store, m, listen).await {
                    Ok(start) => self.start_manager(m, start).await,
                    Err(e) => Err(e),
                };
                match started {
                    Ok(running) => {
                        if let Some(task) = self.watcher.take() {
                            task.stop().await;
                        }
                        info!("promoted: this node is a manager now");
                        self.manager = Some(running);
                        self.feed_manager();
                    }
                    Err(e) => warn!("could not start this node's manager: {e}"),
                }
            }
            (false, true) if own.is_some() => {
                // Still a member of the Raft group: the others need this manager to commit its
                // own removal (two managers, one demoted, is a quorum of both). It goes once
                // they have taken it out (or stopped sending to it), or after the grace.
                let now = Instant::now();
                let since = *self.demoted_at.get_or_insert(now);
                let needed = self.manager.as_ref().is_some_and(|(manager, _)| {
                    manager.raft().in_group() && manager.raft().leader_quiet_for() < LEADER_GONE
                });
                if needed && now < since + DEMOTION_GRACE {
                    self.role_wake = Some(now + ROLE_RECHECK);
                    return;
                }
                self.demoted_at = None;
                if let Some((manager, task)) = self.manager.take() {
                    task.stop().await;
                    manager.shutdown().await;
                }
                if let Err(e) = self
                    .setup
                    .store
                    .write(&[Write::ClearManager, Write::ClearRaft])
                    .await
                {
                    warn!("could not clear this node's manager state: {e}");
                }
                info!("demoted: this node is a worker now");
                self.watcher = Some(self.start_watcher());
            }
            _ => {}
        }
    }

    /// The set of nodes gossip sees up goes to this node's manager (node STATUS).
    fn feed_manager(&mut self) {
        let up = self
            .gossip
            .as_mut()
            .map(|g| g.up.borrow_and_update().clone());
        if let (Some((manager, _)), Some(up)) = (&self.manager, up) {
            manager.set_gossip_up(Some(up));
        }
    }

    /// Brings the data path up once gossip runs and this node has an overlay address, and
    /// keeps it following the view and what peers announce. Failures are logged once and
    /// retried (the control plane runs without it).
    fn steer_data_path(&mut self) {
        let now = Instant::now();
        self.data_path_wake = None;
        let (Some(params), Some(incarnation), Some(g), Some(m)) = (
            self.setup.data_path.as_ref(),
            self.incarnation,
            self.gossip.as_mut(),
            self.setup.membership.get(),
        ) else {
            return;
        };
        let announced = g.announced.borrow_and_update().clone();
        let up = g.up.borrow().clone();
        let dp = match &self.data_path {
            Some(dp) => dp.clone(),
            None => {
                let params = datapath::Params {
                    incarnation,
                    ..params.clone()
                };
                match DataPath::start(&m.view, &m.node_id, *self.setup.node_secret, &params) {
                    Ok(dp) => {
                        info!(
                            interface = %params.interface,
                            incarnation = ?params.incarnation,
                            aead = shoal_vxlan::crypto::backend(),
                            "data path up"
                        );
                        self.data_path_warned = false;
                        let dp = Arc::new(dp);
                        self.data_path = Some(dp.clone());
                        self.publish();
                        dp
                    }
                    Err(e) => {
                        if !self.data_path_warned {
                            warn!("data path did not start: {e}; retrying every 5 s");
                            self.data_path_warned = true;
                        }
                        self.data_path_wake = Some(now + DATA_PATH_RETRY);
                        return;
                    }
                }
            }
        };
        self.data_path_wake = match dp.apply_view(&m.view, &m.node_id, &announced, now) {
            Ok(next) => next,
            Err(e) => {
                warn!("data path could not follow the cluster view: {e}");
                Some(now + DATA_PATH_RETRY)
            }
        };
        let endpoints = self.setup.endpoints.clone();
        endpoints.set_up(up);
        let membership = self.setup.membership.clone();
        let synced = dp.sync_networks(|| match membership.get() {
            Some(m) => endpoints.segments(&m.view, &m.node_id),
            None => (Vec::new(), Vec::new()),
        });
        match synced {
            Ok(()) => {
                // A device the data path (re)made goes onto its bridge.
                let mtu = dp.underlay_mtu();
                let address = m.view.node(&m.node_id).map(|n| n.addr);
                tokio::spawn(async move {
                    if let Err(e) = endpoints.wire_devices(&m.view, mtu).await {
                        warn!("could not put a network's device on its bridge: {e}");
                    }
                    if let Some(std::net::IpAddr::V4(address)) = address {
                        endpoints.apply_services(&m.view, &m.node_id, address).await;
                    }
                });
            }
            Err(e) => {
                warn!("data path could not follow the user networks: {e}");
                self.data_path_wake = Some(now + DATA_PATH_RETRY);
            }
        }
    }

    /// One log line per interval with the data path's drops by reason, when there were any
    /// (never a line per packet).
    fn log_drops(&mut self) {
        let Some(dp) = self.data_path.clone() else {
            self.drops = None;
            return;
        };
        let now = dp.status().counters.drops;
        if let Some((prev_dp, prev)) = &self.drops {
            if Arc::ptr_eq(prev_dp, &dp) {
                if let Some((total, reasons)) = datapath::drop_summary(prev, &now) {
                    warn!(
                        total,
                        %reasons,
                        "data path dropped {total} packets in the last {}s",
                        datapath::DROP_SUMMARY_INTERVAL.as_secs()
                    );
                }
            }
        }
        self.drops = Some((dp, now));
    }

    fn publish(&self) {
        let running = Running {
            manager: self.manager.as_ref().map(|(m, _)| m.clone()),
            gossip: self.gossip.as_ref().map(|g| g.link.handle()),
            gossip_keys: self.gossip.as_ref().map(|g| g.link.live_keys()),
            data_path: self.data_path.clone(),
        };
        self.published.send_replace(Arc::new(running));
    }
}
