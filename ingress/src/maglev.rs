//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), and the flow hash the routing mesh looks it up with.
//!
//! A [`Maglev`] table has a prime number of entries, each naming a backend. Every backend
//! claims entries in turn, in the order of its own permutation of the table (an offset and a
//! skip drawn from two hashes of its key), so each backend holds within one entry of `M / N`,
//! and a change of the backend set moves few entries besides those of the backend that left
//! or came.
//!
//! Every node must build the same table from the same backends and compute the same hash for
//! the same flow, so both hashes are SipHash-1-3 (the `siphasher` crate) under fixed keys,
//! never `std`'s `DefaultHasher` (whose algorithm may change between Rust releases) nor a
//! randomly keyed one. The keys are the ASCII strings below read as little-endian `u64`s:
//!
//! | use                  | `k0`        | `k1`        |
//! |----------------------|-------------|-------------|
//! | `h1`, the offset     | `"shoal/mg"` | `"lv/offst"` |
//! | `h2`, the skip       | `"shoal/mg"` | `"lv/skip "` |
//! | [`flow_hash`]        | `"shoal/me"` | `"sh/flow "` |
//!
//! Changing a key, the byte layout of [`flow_hash`] or the populate algorithm changes which
//! backend a flow goes to on a node running the new code but not on the others: the pinned
//! vectors in the tests fail on any such change.
//!
//! Pure code: no IO, no clock, no randomness.

use std::net::SocketAddrV4;

use siphasher::sip::SipHasher13;

/// The default table size: a prime, about 330 entries per backend at 50 backends (the paper
/// advises `M` well above 100 times the number of backends).
pub const TABLE_SIZE: usize = 16_381;

const fn key(ascii: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*ascii)
}

/// SipHash-1-3 keys of `h1` (a backend's offset in the table).
const OFFSET_KEY: (u64, u64) = (key(b"shoal/mg"), key(b"lv/offst"));
/// SipHash-1-3 keys of `h2` (a backend's skip).
const SKIP_KEY: (u64, u64) = (key(b"shoal/mg"), key(b"lv/skip "));
/// SipHash-1-3 keys of [`flow_hash`].
const FLOW_KEY: (u64, u64) = (key(b"shoal/me"), key(b"sh/flow "));

fn sip13((k0, k1): (u64, u64), bytes: &[u8]) -> u64 {
    SipHasher13::new_with_keys(k0, k1).hash(bytes)
}

/// A Maglev lookup table: flow hash to backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    /// Entry `i` is the index of a backend in the keys the table was built from; empty when
    /// there are no backends.
    table: Vec<u16>,
    /// How many backends the table was built from.
    backends: usize,
}

impl Maglev {
    /// Builds the table of `size` entries for the backends whose identities are `keys` (for
    /// the mesh, the 4 bytes of each backend's IPv4 address). The index [`pick`](Self::pick)
    /// returns is a position in `keys`, so callers pass them in an order every node agrees on
    /// (sorted). Duplicate keys share their entries between them unevenly; do not pass any.
    ///
    /// # Panics
    /// If `size` is not a prime, or there are more than `u16::MAX` keys. Both are the
    /// caller's constants, not input from the network.
    pub fn new(keys: &[impl AsRef<[u8]>], size: usize) -> Maglev {
        assert!(
            is_prime(size),
            "a Maglev table's size must be a prime, not {size}"
        );
        assert!(
            keys.len() <= usize::from(u16::MAX),
            "a Maglev table holds at most {} backends, not {}",
            u16::MAX,
            keys.len()
        );
        if keys.is_empty() {
            return Maglev {
                table: Vec::new(),
                backends: 0,
            };
        }
        let m = size as u64;
        // Each backend's permutation is `(offset + j * skip) mod M`, walked one step at a time.
        let skips: Vec<u64> = keys
            .iter()
            .map(|k| sip13(SKIP_KEY, k.as_ref()) % (m - 1) + 1)
            .collect();
        let mut next: Vec<u64> = keys
            .iter()
            .map(|k| sip13(OFFSET_KEY, k.as_ref()) % m)
            .collect();
        const EMPTY: u16 = u16::MAX;
        let mut table = vec![EMPTY; size];
        let mut filled = 0;
        'fill: loop {
            for (i, (pos, skip)) in next.iter_mut().zip(&skips).enumerate() {
                // M is prime and 0 < skip < M, so the walk visits every entry before repeating:
                // an empty one is found while any is left.
                while table[*pos as usize] != EMPTY {
                    *pos = (*pos + skip) % m;
                }
                table[*pos as usize] = i as u16;
                *pos = (*pos + skip) % m;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev {
            table,
            backends: keys.len(),
        }
    }

    /// The index (in the keys the table was built from) of the backend for a flow of hash
    /// `hash` (see [`flow_hash`]); `None` when there are no backends.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let slot = (hash % self.table.len() as u64) as usize;
        self.table.get(slot).map(|&i| usize::from(i))
    }

    /// Whether the table was built from no backends ([`pick`](Self::pick) gives `None`).
    pub fn is_empty(&self) -> bool {
        self.backends == 0
    }

    /// How many backends the table was built from.
    pub fn len(&self) -> usize {
        self.backends
    }
}

/// The hash of a flow, as every node computes it: SipHash-1-3 under a fixed key over the 13
/// bytes `proto, src ip, src port (big-endian), dst ip, dst port (big-endian)`.
///
/// The mesh hashes the client's address and port as `src` and the published address and port
/// (the one the client connected to) as `dst`, never a translated one, so the ingress node and
/// any other node agree on the backend.
pub fn flow_hash(proto: u8, src: SocketAddrV4, dst: SocketAddrV4) -> u64 {
    let mut bytes = [0u8; 13];
    bytes[0] = proto;
    bytes[1..5].copy_from_slice(&src.ip().octets());
    bytes[5..7].copy_from_slice(&src.port().to_be_bytes());
    bytes[7..11].copy_from_slice(&dst.ip().octets());
    bytes[11..13].copy_from_slice(&dst.port().to_be_bytes());
    sip13(FLOW_KEY, &bytes)
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    /// `n` backends' keys: the addresses 10.0.x.y from 10.0.0.2 on, sorted.
    fn keys(n: usize) -> Vec<[u8; 4]> {
        (0..n)
            .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 2)) + i as u32).octets())
            .collect()
    }

    fn counts(m: &Maglev) -> Vec<usize> {
        let mut c = vec![0; m.len()];
        for &i in &m.table {
            c[usize::from(i)] += 1;
        }
        c
    }

    #[test]
    fn table_size_is_prime() {
        assert!(is_prime(TABLE_SIZE));
        assert!(!is_prime(16_383));
        assert!(!is_prime(1) && !is_prime(0) && is_prime(2) && is_prime(7));
    }

    #[test]
    #[should_panic(expected = "must be a prime")]
    fn rejects_a_size_that_is_not_prime() {
        let _ = Maglev::new(&keys(3), 16_384);
    }

    /// Any change of the hash keys, the flow layout or the populate algorithm fails here: the
    /// nodes of a cluster running different code would send a flow to different backends.
    #[test]
    fn pinned_vectors() {
        let m = Maglev::new(&keys(3), TABLE_SIZE);
        assert_eq!(
            m.table[..24],
            [0, 2, 0, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 0, 0, 2, 0, 2, 2, 2, 2, 0]
        );
        assert_eq!(sip13(OFFSET_KEY, &[10, 0, 0, 2]), 0xa89c_88b2_476f_c94e);
        assert_eq!(sip13(SKIP_KEY, &[10, 0, 0, 2]), 0x4c30_6f89_1b07_46dd);
        let client = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000);
        let published = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 8080);
        assert_eq!(flow_hash(6, client, published), 0xcd0d_2c09_c927_234d);
        assert_eq!(flow_hash(17, client, published), 0x49a0_2117_9a9f_52f2);
        assert_eq!(flow_hash(6, published, client), 0x196b_4e32_20b4_db7d);
        assert_eq!(m.pick(0xcd0d_2c09_c927_234d), Some(1));
    }

    #[test]
    fn no_backends_picks_none() {
        let m = Maglev::new(&Vec::<[u8; 4]>::new(), TABLE_SIZE);
        assert!(m.is_empty());
        assert_eq!(m.len(), 0);
        assert_eq!(m.pick(0), None);
        assert_eq!(m.pick(u64::MAX), None);
    }

    #[test]
    fn one_backend_gets_everything() {
        let m = Maglev::new(&keys(1), TABLE_SIZE);
        assert_eq!(m.len(), 1);
        assert!(m.table.iter().all(|&i| i == 0));
    }

    #[test]
    fn same_keys_same_table() {
        for n in [1, 2, 7, 50] {
            assert_eq!(
                Maglev::new(&keys(n), TABLE_SIZE),
                Maglev::new(&keys(n), TABLE_SIZE)
            );
        }
        // Any `AsRef<[u8]>` of the same bytes.
        let as_vecs: Vec<Vec<u8>> = keys(5).iter().map(|k| k.to_vec()).collect();
        assert_eq!(
            Maglev::new(&as_vecs, TABLE_SIZE),
            Maglev::new(&keys(5), TABLE_SIZE)
        );
    }

    /// Every backend claims one entry a turn, so each holds `M / N` rounded down or up.
    #[test]
    fn balanced() {
        for n in 2..=50 {
            let m = Maglev::new(&keys(n), TABLE_SIZE);
            let fair = TABLE_SIZE as f64 / n as f64;
            for (i, &c) in counts(&m).iter().enumerate() {
                assert!(
                    (c as f64) >= 0.9 * fair && (c as f64) <= 1.1 * fair,
                    "{n} backends: backend {i} holds {c} entries, fair is {fair:.1}"
                );
                assert!(c.abs_diff(TABLE_SIZE / n) <= 1, "{n}: {c}");
            }
        }
    }

    /// Removing a backend moves its own entries and few others: under 2% of the table, and
    /// under 0.6 of a backend's share (measured: 9 of 16,381 at 3 backends, 171 at 50, where a
    /// share is 328; Maglev trades this little disruption for its exact balance).
    #[test]
    fn removing_a_backend_disrupts_little() {
        for n in [3, 5, 10, 20, 50] {
            let before_keys = keys(n);
            let before = Maglev::new(&before_keys, TABLE_SIZE);
            for gone in [0, n / 2, n - 1] {
                let mut after_keys = before_keys.clone();
                after_keys.remove(gone);
                let after = Maglev::new(&after_keys, TABLE_SIZE);
                let mut others_moved = 0;
                for (b, a) in before.table.iter().zip(&after.table) {
                    let b = usize::from(*b);
                    if b == gone {
                        continue;
                    }
                    if before_keys[b] != after_keys[usize::from(*a)] {
                        others_moved += 1;
                    }
                }
                let fair = TABLE_SIZE as f64 / n as f64;
                assert!(
                    (others_moved as f64) < 0.02 * TABLE_SIZE as f64
                        && (others_moved as f64) < 0.6 * fair,
                    "{n} backends, backend {gone} removed: {others_moved} other entries moved"
                );
            }
        }
    }

    /// Adding a backend moves its fair share, `M / (N + 1)`, to it, and under 2% of the table
    /// besides (measured: 13 more at 2 backends, 148 at 49).
    #[test]
    fn adding_a_backend_moves_its_share() {
        for n in [2, 5, 10, 20, 49] {
            let before_keys = keys(n);
            let after_keys = keys(n + 1);
            let before = Maglev::new(&before_keys, TABLE_SIZE);
            let after = Maglev::new(&after_keys, TABLE_SIZE);
            let moved = before
                .table
                .iter()
                .zip(&after.table)
                .filter(|(b, a)| before_keys[usize::from(**b)] != after_keys[usize::from(**a)])
                .count();
            let share = TABLE_SIZE as f64 / (n + 1) as f64;
            assert!(
                (moved as f64) - share < 0.02 * TABLE_SIZE as f64,
                "{n} + 1 backends: {moved} entries moved, share {share:.0}"
            );
            assert!((moved as f64) >= share - 1.0, "{n}: {moved}");
        }
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let a = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 8080);
        let h = flow_hash(6, a, b);
        assert_ne!(h, flow_hash(17, a, b));
        assert_ne!(h, flow_hash(6, SocketAddrV4::new(*a.ip(), 40_001), b));
        assert_ne!(
            h,
            flow_hash(6, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 8), 40_000), b)
        );
        assert_ne!(h, flow_hash(6, a, SocketAddrV4::new(*b.ip(), 8081)));
        assert_ne!(h, flow_hash(6, b, a));
    }

    proptest! {
        #[test]
        fn pick_is_a_backend(n in 1usize..80, hash in any::<u64>(), small in any::<bool>()) {
            let size = if small { 13 } else { 251 };
            let m = Maglev::new(&keys(n), size);
            let i = m.pick(hash);
            prop_assert!(matches!(i, Some(i) if i < n));
        }

        #[test]
        fn pick_is_a_backend_of_any_keys(
            ks in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 0..8), 1..20),
            hash in any::<u64>(),
        ) {
            let ks: Vec<Vec<u8>> = ks.into_iter().collect();
            let m = Maglev::new(&ks, 101);
            prop_assert!(matches!(m.pick(hash), Some(i) if i < ks.len()));
            prop_assert_eq!(m.len(), ks.len());
        }
    }
}
