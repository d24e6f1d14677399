//! The one place the control plane meets `shoal-gossip`: it starts the gossip driver from a
//! node's membership, keeps the driver's admission list, keys and metadata in step with the
//! cluster view, and turns gossip events into the set of node IDs gossip sees up.
//!
//! Admission is exactly the manager's node list (ID, X25519 and Ed25519 public keys, nodes
//! that left excluded): every gossip datagram and push-pull stream is sealed for one peer
//! under their pair key, and every record a member spreads is signed by its author, so a
//! member can speak only for itself, and only what the manager issued is believed. The
//! gossip keyring is the view's gossip keys: a new key opens at once and starts sealing only
//! [`KEY_GRACE`](crate::cluster::KEY_GRACE) after this node first saw it, by which time every node holds it, so a
//! rotation drops nothing; the key before it stops opening [`KEY_RETIRE`](crate::cluster::KEY_RETIRE) after that first
//! sight, so a node that was removed or left (and caused the rotation) is cut off for good
//! then, not at the next scheduled rotation.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use shoal_gossip::driver::{self, Handle, HandleError, StartError};
use shoal_gossip::{Event, Key, Keyring, Metadata, NodeKeys, PublicKeys};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use shoal_vxlan::crypto::Incarnation;

use crate::agent::datapath::Announced;
use crate::cluster::{sealing_order, ClusterView, KeyEntry, LiveKeys, Role};
use crate::id::NodeId;
use crate::store::Membership;

/// Default gossip port.
pub const DEFAULT_PORT: u16 = 7946;

/// Why the gossip link could not start or follow a view.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The view has no gossip key.
    #[error("the cluster view has no gossip key; the manager state is damaged")]
    NoKey,
    /// This node is not in the view.
    #[error("this node is not in the cluster view")]
    NotInView,
    /// A node ID the gossip crate does not accept.
    #[error("node ID {0} is not valid for gossip")]
    BadId(String),
    /// The driver did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The driver refused an update or has stopped.
    #[error(transparent)]
    Handle(#[from] HandleError),
}

/// A running gossip driver tied to this node's membership.
pub struct Link {
    handle: Handle,
    public_key: [u8; 32],
    incarnation: Incarnation,
    up: watch::Receiver<Arc<HashSet<NodeId>>>,
    announced: watch::Receiver<Arc<HashMap<NodeId, Announced>>>,
    entries: watch::Receiver<u64>,
    events: JoinHandle<()>,
    last: Option<Metadata>,
    seen: HashMap<u32, Instant>,
    switch_at: Option<Instant>,
    live: LiveKeys,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.handle.local_addr())
            .finish()
    }
}

fn gossip_id(id: &NodeId) -> Result<shoal_gossip::NodeId, LinkError> {
    id.as_str()
        .parse()
        .map_err(|_| LinkError::BadId(id.to_string()))
}

fn key(entry: &KeyEntry) -> Key {
    // Key ids grow by one per rotation, so consecutive ids never collide modulo 256.
    Key {
        id: (entry.id & 0xff) as u8,
        secret: entry.key,
    }
}

/// The gossip keyring for a view at `now`, which ids it holds, and when it next changes by
/// itself.
///
/// `seen` records when this node first saw each key id (kept by the caller between calls). See
/// [`sealing_order`] for which key seals and which opens. Pure: time is an input.
pub fn keyring_at(
    view: &ClusterView,
    seen: &mut HashMap<u32, Instant>,
    now: Instant,
) -> Result<(Keyring, LiveKeys, Option<Instant>), LinkError> {
    let (seal, open, next) = sealing_order(&view.keys.gossip, seen, now).ok_or(LinkError::NoKey)?;
    let ring = match open {
        Some(open) => {
            Keyring::with_previous(key(seal), key(open)).unwrap_or_else(|_| Keyring::new(key(seal)))
        }
        None => Keyring::new(key(seal)),
    };
    let live = LiveKeys {
        sealing: seal.id,
        also_open: open.map(|k| k.id),
    };
    Ok((ring, live, next))
}

/// The admission list for a view: every node that has not left, with the public keys the
/// manager issued it (X25519 for the pair keys, Ed25519 for what it signs).
pub fn admission(view: &ClusterView) -> Vec<(shoal_gossip::NodeId, PublicKeys)> {
    view.nodes
        .iter()
        .filter(|n| !n.left)
        .filter_map(|n| {
            let keys = PublicKeys {
                x25519: n.public_key,
                ed25519: n.signing_key,
            };
            gossip_id(&n.id).ok().map(|id| (id, keys))
        })
        .collect()
}

/// The other nodes that have not left, with their gossip addresses.
pub fn seeds(
    view: &ClusterView,
    me: &NodeId,
    port: u16,
) -> Vec<(shoal_gossip::NodeId, SocketAddr)> {
    view.nodes
        .iter()
        .filter(|n| !n.left && &n.id != me)
        .filter_map(|n| {
            let id = gossip_id(&n.id).ok()?;
            Some((id, SocketAddr::new(n.addr, port)))
        })
        .collect()
}

/// Our gossip metadata from the view.
pub fn metadata(
    view: &ClusterView,
    me: &NodeId,
    public_key: [u8; 32],
    incarnation: Incarnation,
) -> Result<Metadata, LinkError> {
    let node = view.node(me).ok_or(LinkError::NotInView)?;
    Ok(Metadata {
        vtep: node.addr,
        data_port: view.ingress.data_path_port,
        public_key,
        incarnation: incarnation.0,
        role: match node.role {
            Role::Worker => shoal_gossip::Role::Worker,
            Role::Manager => shoal_gossip::Role::Manager,
        },
        version: crate::agent::VERSION.chars().take(32).collect(),
    })
}

/// Sets this node's gossip entry `key`. A version gossip already holds (the same entry,
/// back from others before we set it: same author and version, same value) is no news; a
/// newer one held is corrected when its event arrives (see [`crate::agent::cni::Endpoints::correct_own`]).
pub async fn announce(handle: &Handle, key: Vec<u8>, version: u64, value: Option<Vec<u8>>) {
    match handle.set_entry(key, version, value).await {
        Ok(()) => {}
        Err(HandleError::Api(shoal_gossip::membership::ApiError::StaleVersion {
            version,
            held,
        })) => {
            debug!(
                version,
                held, "endpoint entry already held at this version or later"
            );
        }
        Err(e) => warn!("could not announce an endpoint in gossip: {e}"),
    }
}

impl Link {
    /// Starts gossip for `m` on `bind` (default: our advertise address and [`DEFAULT_PORT`]),
    /// as the node whose X25519 secret is `node_secret`, joining through every other node.
    pub async fn start(
        m: &Membership,
        node_secret: &[u8; 32],
        incarnation: Incarnation,
        bind: Option<SocketAddr>,
        endpoints: Arc<crate::agent::cni::Endpoints>,
    ) -> Result<Self, LinkError> {
        let me = m.view.node(&m.node_id).ok_or(LinkError::NotInView)?;
        let bind = bind.unwrap_or(SocketAddr::new(me.addr, DEFAULT_PORT));
        let advertise = SocketAddr::new(me.addr, bind.port());
        let keys = NodeKeys::from_secret(*node_secret);
        let public_key = keys.public().x25519;
        let meta = metadata(&m.view, &m.node_id, public_key, incarnation)?;
        let mut seen = HashMap::new();
        let (ring, live, switch_at) = keyring_at(&m.view, &mut seen, Instant::now())?;
        let mut cfg =
            driver::Config::new(gossip_id(&m.node_id)?, advertise, meta.clone(), ring, keys);
        cfg.bind = bind;
        // The driver's rare lines (refused connections) go through the agent's log, in its
        // format (`--log-format json` stays JSON), not straight to standard error.
        cfg.log = |line| warn!(target: "shoal_gossip", "{line}");
        cfg.seeds = seeds(&m.view, &m.node_id, bind.port());
        cfg.admission = shoal_gossip::Admission::only(admission(&m.view));
        let (handle, mut events) = driver::start(cfg).await?;
        info!(%bind, "gossip started");
        let (up_tx, up) = watch::channel(Arc::new(HashSet::new()));
        let (announced_tx, announced) = watch::channel(Arc::new(HashMap::new()));
        let (entries_tx, entries) = watch::channel(0u64);
        // This node's endpoints, announced again (a restart: gossip holds nothing of ours).
        for (key, version, value) in endpoints.own_entries() {
            announce(&handle, key, version, value).await;
        }
        let own = m.node_id.clone();
        let own_handle = handle.clone();
        let task = tokio::spawn(async move {
            let mut set = HashSet::new();
            let mut known: HashMap<NodeId, Announced> = HashMap::new();
            while let Some(event) = events.recv().await {
                let (member, is_up) = match &event {
                    Event::Up(m) | Event::Updated(m) => (m, true),
                    Event::Down(m) | Event::Left(m) => (m, false),
                    Event::Entry {
                        author,
                        key,
                        version,
                        value,
                    } => {
                        let Ok(author) = author.as_str().parse::<NodeId>() else {
                            continue;
                        };
                        if author == own {
                            // One of ours as others hold it (an earlier run's): say again
                            // what is true now, above the version they hold.
                            if let Some((version, value)) =
                                endpoints.correct_own(key, *version, value.as_deref())
                            {
                                announce(&own_handle, key.clone(), version, value).await;
                            }
                        } else if endpoints.take_entry(&author, key, value.as_deref()) {
                            entries_tx.send_modify(|n| *n += 1);
                        }
                        continue;
                    }
                };
                let Ok(id) = member.id.as_str().parse::<NodeId>() else {
                    continue;
                };
                debug!(node = %id, up = is_up, "gossip event");
                // What a node said of itself stays known while it is down: it may come back,
                // and its data-path entries stay meanwhile.
                if let Some(meta) = &member.metadata {
                    let h = Announced {
                        public_key: meta.public_key,
                        incarnation: Incarnation(meta.incarnation),
                    };
                    if known.insert(id.clone(), h) != Some(h) {
                        announced_tx.send_replace(Arc::new(known.clone()));
                    }
                }
                let changed = if is_up {
                    set.insert(id.clone())
                } else {
                    set.remove(&id)
                };
                if changed {
                    let addr = member.addr;
                    match &event {
                        Event::Left(_) => info!(node = %id, %addr, "peer left"),
                        _ if is_up => info!(node = %id, %addr, "peer up"),
                        _ => warn!(node = %id, %addr, "peer down"),
                    }
                    up_tx.send_replace(Arc::new(set.clone()));
                }
            }
        });
        Ok(Self {
            handle,
            public_key,
            incarnation,
            up,
            announced,
            entries,
            events: task,
            last: Some(meta),
            seen,
            switch_at,
            live,
        })
    }

    /// The driver handle (for stats and members).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Node IDs gossip sees up now (not ourselves).
    pub fn up(&self) -> Arc<HashSet<NodeId>> {
        self.up.borrow().clone()
    }

    /// What each node announced of itself in gossip: public key and data-path incarnation.
    pub fn announced(&self) -> Arc<HashMap<NodeId, Announced>> {
        self.announced.borrow().clone()
    }

    /// A receiver that changes whenever [`Link::announced`] does.
    pub fn watch_announced(&self) -> watch::Receiver<Arc<HashMap<NodeId, Announced>>> {
        self.announced.clone()
    }

    /// A receiver that changes whenever the endpoints other nodes announce do.
    pub fn watch_entries(&self) -> watch::Receiver<u64> {
        self.entries.clone()
    }

    /// A receiver that changes whenever the up set does.
    pub fn watch_up(&self) -> watch::Receiver<Arc<HashSet<NodeId>>> {
        self.up.clone()
    }

    /// When the keyring next changes by itself (a new key starts sealing); call
    /// [`Link::refresh_keys`] then.
    pub fn key_switch_at(&self) -> Option<Instant> {
        self.switch_at
    }

    /// The gossip keys live on this node: the one that seals, and the other one that opens.
    pub fn live_keys(&self) -> LiveKeys {
        self.live
    }

    /// Re-applies the keyring for `view` at the current time.
    pub fn refresh_keys(&mut self, view: &ClusterView) -> Result<(), LinkError> {
        let result = keyring_at(view, &mut self.seen, Instant::now());
        // Never leave a switch time in the past behind: the caller would wake at once again.
        self.switch_at = result.as_ref().ok().and_then(|(_, _, next)| *next);
        let (ring, live, _) = result?;
        self.handle.set_keys(ring)?;
        self.live = live;
        Ok(())
    }

    /// Brings admission, keys and our metadata in step with a new view.
    pub async fn apply_view(&mut self, m: &Membership) -> Result<(), LinkError> {
        self.handle.set_admission(admission(&m.view))?;
        self.refresh_keys(&m.view)?;
        let meta = metadata(&m.view, &m.node_id, self.public_key, self.incarnation)?;
        if self.last.as_ref() != Some(&meta) {
            self.last = Some(meta.clone());
            self.handle.update_metadata(meta).await?;
        }
        Ok(())
    }

    /// Leaves gracefully (when `leave`) and stops the driver.
    pub async fn stop(self, leave: bool) {
        if leave {
            if let Err(e) = self.handle.leave().await {
                warn!("gossip leave: {e}");
            }
        }
        self.handle.shutdown().await;
        self.events.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{KEY_GRACE, KEY_RETIRE};
    use crate::manager::state::tests::{init_cmd, node};
    use crate::manager::state::{Command, State};
    use std::time::Duration;

    fn view() -> ClusterView {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        let mut gone = node(3, Role::Worker);
        gone.left = true;
        s.apply(Command::AddNode(Box::new(gone))).unwrap();
        s.view().unwrap()
    }

    #[test]
    fn admission_and_seeds_follow_the_node_list() {
        let v = view();
        let list = admission(&v);
        assert_eq!(list.len(), 2, "the node that left is not admitted");
        let two = node(2, Role::Worker);
        assert!(list.iter().any(|(id, keys)| id.as_str() == two.id.as_str()
            && keys.x25519 == two.public_key
            && keys.ed25519 == two.signing_key));
        let me = NodeId::from_random(1);
        let seeds = seeds(&v, &me, 7946);
        assert_eq!(seeds.len(), 1);
        assert_eq!(seeds[0].0.as_str(), two.id.as_str());
        assert_eq!(seeds[0].1, "198.18.0.2:7946".parse().unwrap());
    }

    #[test]
    fn a_new_key_opens_at_once_and_seals_after_the_grace() {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        let t0 = Instant::now();
        let mut seen = HashMap::new();
        let (ring, _, next) = keyring_at(&s.view().unwrap(), &mut seen, t0).unwrap();
        assert_eq!(ring.current().id, 1);
        assert!(ring.previous().is_none());
        assert_eq!(next, None);

        s.apply(Command::RotateKeys {
            gossip_key: [5; 32],
            data_path_key: [6; 32],
            at: 2,
        })
        .unwrap();
        let v = s.view().unwrap();
        let t1 = t0 + Duration::from_secs(100);
        // Just seen: the old key still seals, the new one already opens.
        let (ring, live, next) = keyring_at(&v, &mut seen, t1).unwrap();
        assert_eq!(
            live,
            LiveKeys {
                sealing: 1,
                also_open: Some(2)
            }
        );
        assert_eq!(
            (ring.current().id, ring.previous().map(|k| k.id)),
            (1, Some(2))
        );
        assert_eq!(next, Some(t1 + KEY_GRACE));
        // After the grace: the new key seals, the old one still opens.
        let (ring, _, next) = keyring_at(&v, &mut seen, t1 + KEY_GRACE).unwrap();
        assert_eq!((ring.current().id, ring.current().secret), (2, [5; 32]));
        assert_eq!(ring.previous().map(|k| k.id), Some(1));
        assert_eq!(next, Some(t1 + KEY_RETIRE));
        // After the retirement: the old one no longer opens.
        let (ring, live, next) = keyring_at(&v, &mut seen, t1 + KEY_RETIRE).unwrap();
        assert_eq!(
            live,
            LiveKeys {
                sealing: 2,
                also_open: None
            }
        );
        assert_eq!(ring.current().id, 2);
        assert_eq!(ring.previous().map(|k| k.id), None);
        assert_eq!(next, None);

        // The next rotation drops key 1 and forgets when it was seen.
        s.apply(Command::RotateKeys {
            gossip_key: [7; 32],
            data_path_key: [8; 32],
            at: 3,
        })
        .unwrap();
        let t2 = t1 + Duration::from_secs(200);
        let (ring, _, _) = keyring_at(&s.view().unwrap(), &mut seen, t2).unwrap();
        assert_eq!(
            (ring.current().id, ring.previous().map(|k| k.id)),
            (2, Some(3))
        );
        assert!(!seen.contains_key(&1));
    }

    #[test]
    fn metadata_from_the_view() {
        let v = view();
        let inc = Incarnation([7; 16]);
        let meta = metadata(&v, &NodeId::from_random(1), [1; 32], inc).unwrap();
        assert_eq!(meta.role, shoal_gossip::Role::Manager);
        assert_eq!(
            Incarnation(meta.incarnation),
            inc,
            "all sixteen bytes travel"
        );
        assert_eq!(meta.data_port, 4789);
        assert_eq!(meta.vtep, "198.18.0.1".parse::<std::net::IpAddr>().unwrap());
        assert!(meta.validate().is_ok());
        assert!(matches!(
            metadata(&v, &NodeId::from_random(9), [1; 32], inc),
            Err(LinkError::NotInView)
        ));
    }
}
