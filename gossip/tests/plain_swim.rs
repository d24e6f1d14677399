//! `Config::plain_swim`: the simulation's baseline is what memberlist runs without Lifeguard.

use std::time::Duration;

use shoal_gossip::Config;

#[test]
fn plain_swim_has_memberlists_fixed_timeout_and_no_lifeguard_parts() {
    // memberlist: SuspicionMult (4) * max(1, log10(n)) * ProbeInterval (1 s).
    for (n, secs) in [(5, 4.0), (200, 4.0 * 200f64.log10()), (1000, 12.0)] {
        let c = Config::plain_swim(n);
        let want = Duration::from_secs_f64(secs);
        for got in [c.suspicion_min, c.suspicion_max] {
            let diff = got.abs_diff(want);
            assert!(
                diff < Duration::from_millis(1),
                "n = {n}: {got:?}, want {want:?}"
            );
        }
        assert!(!c.local_health && !c.dynamic_suspicion && !c.buddy_system);
        assert_eq!(c.confirm_probes, 0);
        assert!(c.flap_damping.is_none());
        assert_eq!(c.swim.num_indirect_probes.get(), 3);
        // Everything else is ours.
        let ours = Config::lan(n);
        assert!(ours.local_health && ours.dynamic_suspicion && ours.buddy_system);
        assert!(ours.flap_damping.is_some());
        assert_eq!(ours.swim.num_indirect_probes.get(), 5);
        assert_eq!(c.swim.probe_period, ours.swim.probe_period);
        assert_eq!(c.swim.probe_rtt, ours.swim.probe_rtt);
        assert_eq!(c.swim.max_transmissions, ours.swim.max_transmissions);
        assert_eq!(c.pushpull_interval, ours.pushpull_interval);
    }
}
