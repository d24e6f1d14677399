//! Sliding anti-replay window, after RFC 6479: a ring of 64-bit blocks, so moving the window
//! forward clears whole blocks instead of shifting bits.
//!
//! The window accepts each counter at most once, accepts counters that arrive out of order as
//! long as they are within [`WINDOW`] of the highest one seen, and refuses older ones.
//! [`Window::check`] tells without changing anything, so a receiver can refuse a duplicate
//! before spending an AEAD open on it; [`Window::accept`] records a counter and must be called
//! only after the datagram has been authenticated, so forged datagrams cannot move the window.

const BLOCK_BITS: u64 = u64::BITS as u64;
const BLOCKS: usize = 64;

/// How many counters behind the highest one seen are still accepted: 4032.
pub const WINDOW: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;

/// Why a counter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This counter was accepted before.
    #[error("counter already seen (replayed or duplicated datagram)")]
    Duplicate,
    /// This counter is further behind the newest one than the window reaches.
    #[error("counter older than the replay window")]
    TooOld,
}

/// The state of one receiving direction.
#[derive(Clone)]
pub struct Window {
    greatest: u64,
    bitmap: [u64; BLOCKS],
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Window {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Window")
            .field("greatest", &self.greatest)
            .finish_non_exhaustive()
    }
}

impl Window {
    /// An empty window: every counter is new.
    pub const fn new() -> Self {
        Window {
            greatest: 0,
            bitmap: [0; BLOCKS],
        }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let block = ((counter / BLOCK_BITS) % BLOCKS as u64) as usize;
        (block, 1 << (counter % BLOCK_BITS))
    }

    /// Whether `counter` would be accepted, without recording it.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter > self.greatest {
            return Ok(());
        }
        if self.greatest - counter >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (block, bit) = Self::slot(counter);
        if self.bitmap[block] & bit != 0 {
            return Err(ReplayError::Duplicate);
        }
        Ok(())
    }

    /// Records `counter`, or refuses it. Call only for authenticated datagrams.
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if counter > self.greatest {
            let current = self.greatest / BLOCK_BITS;
            let target = counter / BLOCK_BITS;
            let advance = (target - current).min(BLOCKS as u64);
            for i in 1..=advance {
                self.bitmap[((current + i) % BLOCKS as u64) as usize] = 0;
            }
            self.greatest = counter;
        }
        let (block, bit) = Self::slot(counter);
        self.bitmap[block] |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = Window::new();
        for c in 0..10_000 {
            w.accept(c).unwrap();
            assert_eq!(w.accept(c), Err(ReplayError::Duplicate));
        }
    }

    #[test]
    fn reordering_inside_window_is_accepted() {
        let mut w = Window::new();
        w.accept(5000).unwrap();
        for c in (5000 - WINDOW + 1..5000).rev() {
            w.accept(c).unwrap();
        }
        assert_eq!(w.accept(5000 - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.accept(4999), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(0), Err(ReplayError::TooOld));
    }

    #[test]
    fn window_is_at_least_2048() {
        let mut w = Window::new();
        w.accept(3000).unwrap();
        w.accept(3000 - 2048).unwrap();
    }

    #[test]
    fn big_jump_clears_everything() {
        let mut w = Window::new();
        for c in 0..200 {
            w.accept(c).unwrap();
        }
        w.accept(1_000_000).unwrap();
        // Everything within the window below the jump is new, though its slots were used before.
        for c in (1_000_000 - WINDOW + 1)..1_000_000 {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
        assert_eq!(w.check(150), Err(ReplayError::TooOld));
    }

    #[test]
    fn check_does_not_record() {
        let mut w = Window::new();
        w.check(7).unwrap();
        w.check(7).unwrap();
        w.accept(7).unwrap();
        assert_eq!(w.check(7), Err(ReplayError::Duplicate));
    }

    #[test]
    fn top_of_range() {
        let mut w = Window::new();
        w.accept(u64::MAX).unwrap();
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Duplicate));
        w.accept(u64::MAX - 1).unwrap();
    }

    proptest! {
        /// Against a model: a set of seen counters and the greatest one.
        #[test]
        fn matches_model(ops in proptest::collection::vec(0u64..20_000, 1..400)) {
            let mut w = Window::new();
            let mut seen = BTreeSet::new();
            let mut greatest: Option<u64> = None;
            for c in ops {
                let expect = match greatest {
                    Some(g) if c <= g && g - c >= WINDOW => Err(ReplayError::TooOld),
                    _ if seen.contains(&c) => Err(ReplayError::Duplicate),
                    _ => Ok(()),
                };
                prop_assert_eq!(w.accept(c), expect, "counter {}", c);
                if expect.is_ok() {
                    seen.insert(c);
                    greatest = Some(greatest.map_or(c, |g| g.max(c)));
                }
            }
        }
    }
}
