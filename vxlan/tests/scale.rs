//! Issue 18, target 6: a thousand peers brought up and a key epoch rotated across them without
//! a gap in the traffic to the peers that are up already (the timing goals are in
//! `benches/scale.rs` and `examples/scale.rs`, not here).

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use shoal_vxlan::testing::scale::{rollout, Cluster, Order};
use shoal_vxlan::DropReason;

const PEERS: u32 = 1000;
const NETWORKS: u32 = 100;
/// The peers that run engines of their own: the first and last up, some in between, and some
/// of the last tenth (brought up while two epochs are live).
const WATCH: [u32; 8] = [0, 1, 99, 450, 899, 900, 950, 999];

/// The control plane's order: every node adds epoch 2, then sends under it, then retires
/// epoch 1; peers keep coming up in the middle of it. Not one frame to or from a peer that is
/// up fails to seal or open.
#[test]
fn bring_up_and_rotation_leave_no_gap() {
    let cluster = Cluster::new(PEERS);
    let gap = rollout(&cluster, PEERS, NETWORKS, &WATCH, Order::Staged);
    // Every watched peer exchanges two frames with the local node per step once it is up.
    assert!(gap.sent > 2 * 8 * 100, "too little traffic: {gap:?}");
    assert_eq!(gap.dropped.total(), 0, "frames lost: {gap:?}");
}

/// The same rollout with the local node retiring epoch 1 before its peers hold epoch 2: the
/// frames it sends under 2 and the ones they send under 1 are dropped until they catch up.
/// This is what the test above would see if the engine dropped an epoch too early.
#[test]
fn retiring_before_the_peers_have_the_new_epoch_shows_the_gap() {
    let cluster = Cluster::new(PEERS);
    let gap = rollout(&cluster, PEERS, NETWORKS, &WATCH, Order::Hasty);
    assert!(gap.dropped_to_peers > 0, "{gap:?}");
    assert!(gap.dropped_from_peers > 0, "{gap:?}");
    assert_eq!(
        gap.dropped.get(DropReason::UnknownEpoch),
        gap.dropped.total(),
        "{gap:?}"
    );
}
