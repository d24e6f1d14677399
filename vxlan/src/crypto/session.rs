//! One direction pair between two nodes under one key epoch: a sealer with its counter and an
//! opener with its replay window.

use super::aead::Aead;
use super::PairKeys;
use crate::replay::{self, ReplayError};
use crate::wire::envelope::{self, Envelope, HEADER_LEN, TAG_LEN};
use crate::wire::Vni;

/// The sealer refuses to go past this counter: the session must be replaced by a new key epoch
/// long before (at 10 million datagrams a second this is 58,000 years away, but the check is
/// what guarantees a nonce is never reused).
pub const COUNTER_LIMIT: u64 = u64::MAX - (1 << 13);

/// Why a frame could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The session has used up its counters; it will not reuse a nonce.
    #[error("session counter exhausted: rotate the data-path key epoch")]
    CounterExhausted,
    /// The buffer cannot hold the headers and the tag around the frame.
    #[error("buffer too small for the envelope headers and tag")]
    BufferTooSmall,
}

/// Why a sealed datagram did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The counter was seen before or is too old.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The tag did not verify: forged, corrupted, or sealed under another key.
    #[error("authentication failed: datagram forged, corrupted or sealed under another key")]
    Authentication,
}

/// Proof that a datagram was authenticated by a session's opener. Only [`Session::open`] makes
/// one, so code that holds one knows the bytes came from the peer that holds the key.
#[derive(Debug)]
pub struct Verified {
    _private: (),
}

/// What a session must remember when its keys are dropped, so that the same keys never start
/// over: the next counter and the replay window.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    next: u64,
    window: replay::Window,
}

/// Sealing and opening state for one peer under one key epoch.
pub struct Session {
    epoch: u32,
    incarnation: u32,
    seal: Aead,
    open: Aead,
    next: u64,
    window: replay::Window,
}

impl core::fmt::Debug for Session {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Session")
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session from the two direction keys, `incarnation` being this node's (written in every
    /// datagram it seals). The AEAD keys are expanded once here (see [`super::backend`] for
    /// which implementation).
    pub fn new(epoch: u32, incarnation: u32, keys: &PairKeys) -> Self {
        Self::resume(epoch, incarnation, keys, SessionState::default())
    }

    /// A session that carries on from `state`: the counter and the replay window of an earlier
    /// session under the same keys, so that re-adding a peer never reuses a nonce nor accepts a
    /// replay.
    pub fn resume(epoch: u32, incarnation: u32, keys: &PairKeys, state: SessionState) -> Self {
        Session {
            epoch,
            incarnation,
            seal: Aead::new(&keys.send),
            open: Aead::new(&keys.recv),
            next: state.next,
            window: state.window,
        }
    }

    /// The counter and window, without the keys, for [`Session::resume`].
    pub fn state(&self) -> SessionState {
        SessionState {
            next: self.next,
            window: self.window.clone(),
        }
    }

    /// The key epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The counter the next sealed datagram will carry.
    pub fn next_counter(&self) -> u64 {
        self.next
    }

    #[cfg(test)]
    pub(crate) fn set_next_counter(&mut self, next: u64) {
        self.next = next;
    }

    /// Seals in place. `datagram` is laid out as [`HEADER_LEN`] bytes for the headers (written
    /// here), the frame, and [`TAG_LEN`] bytes for the tag (written here).
    pub fn seal(&mut self, vni: Vni, datagram: &mut [u8]) -> Result<(), SealError> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(SealError::BufferTooSmall);
        }
        if self.next >= COUNTER_LIMIT {
            return Err(SealError::CounterExhausted);
        }
        let counter = self.next;
        self.next += 1;
        envelope::Repr {
            vni,
            epoch: self.epoch,
            incarnation: self.incarnation,
            counter,
        }
        .emit(datagram);
        let mut env = Envelope::new_unchecked(&mut *datagram);
        let (aad, body, _) = env.split_mut();
        let tag = self
            .seal
            .seal(envelope::Repr::nonce(counter), aad, body)
            // The AEAD fails only for messages over 2^38 bytes, far beyond any buffer.
            .map_err(|_| SealError::BufferTooSmall)?;
        let tag_at = datagram.len() - TAG_LEN;
        datagram[tag_at..].copy_from_slice(&tag);
        Ok(())
    }

    /// Opens a checked envelope in place: replay check, authentication, then the window moves.
    /// On success the ciphertext bytes of `env` hold the frame.
    pub fn open<T>(&mut self, env: &mut Envelope<T>) -> Result<Verified, OpenError>
    where
        T: AsRef<[u8]> + AsMut<[u8]>,
    {
        let counter = env.counter();
        self.window.check(counter)?;
        let (aad, body, tag) = env.split_mut();
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Authentication)?;
        self.open
            .open(envelope::Repr::nonce(counter), aad, body, tag)
            .map_err(|_| OpenError::Authentication)?;
        self.window.accept(counter)?;
        Ok(Verified { _private: () })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(send: u8, recv: u8) -> PairKeys {
        PairKeys {
            send: [send; 32],
            recv: [recv; 32],
        }
    }

    fn pair() -> (Session, Session) {
        (
            Session::new(9, 1, &keys(1, 2)),
            Session::new(9, 2, &keys(2, 1)),
        )
    }

    fn sealed(s: &mut Session, frame: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; HEADER_LEN + frame.len() + TAG_LEN];
        d[HEADER_LEN..HEADER_LEN + frame.len()].copy_from_slice(frame);
        s.seal(Vni::new(4096).unwrap(), &mut d).unwrap();
        d
    }

    #[test]
    fn seal_open_round_trip_and_replay() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, b"hello frame");
        assert_ne!(&d[HEADER_LEN..HEADER_LEN + 11], b"hello frame");
        let mut env = Envelope::new_checked(d.clone()).unwrap();
        b.open(&mut env).unwrap();
        assert_eq!(
            &env.into_inner()[HEADER_LEN..HEADER_LEN + 11],
            b"hello frame"
        );
        let mut again = Envelope::new_checked(d).unwrap();
        assert_eq!(
            b.open(&mut again).unwrap_err(),
            OpenError::Replay(ReplayError::Duplicate)
        );
    }

    #[test]
    fn counters_increase_and_never_repeat() {
        let (mut a, _) = pair();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let d = sealed(&mut a, b"x");
            assert!(seen.insert(Envelope::new_checked(&d[..]).unwrap().counter()));
        }
        assert_eq!(a.next_counter(), 100);
    }

    #[test]
    fn refuses_past_counter_limit() {
        let (mut a, mut b) = pair();
        a.set_next_counter(COUNTER_LIMIT - 1);
        let d = sealed(&mut a, b"last");
        b.open(&mut Envelope::new_checked(d).unwrap()).unwrap();
        let mut d = vec![0u8; HEADER_LEN + 4 + TAG_LEN];
        assert_eq!(
            a.seal(Vni::new(1).unwrap(), &mut d),
            Err(SealError::CounterExhausted)
        );
        assert_eq!(
            a.next_counter(),
            COUNTER_LIMIT,
            "a refused seal uses no counter"
        );
    }

    #[test]
    fn resume_keeps_counter_and_window() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, b"before");
        b.open(&mut Envelope::new_checked(d.clone()).unwrap())
            .unwrap();
        let (sa, sb) = (a.state(), b.state());
        // The old sessions are replaced (shadowed) by ones resumed from their state.
        let mut a = Session::resume(9, 1, &keys(1, 2), sa);
        let mut b = Session::resume(9, 2, &keys(2, 1), sb);
        assert_eq!(a.next_counter(), 1);
        assert_eq!(
            b.open(&mut Envelope::new_checked(d).unwrap()).unwrap_err(),
            OpenError::Replay(ReplayError::Duplicate)
        );
        let d = sealed(&mut a, b"after");
        b.open(&mut Envelope::new_checked(d).unwrap()).unwrap();
    }

    #[test]
    fn forged_datagram_does_not_move_window() {
        let (mut a, mut b) = pair();
        let d = sealed(&mut a, b"real");
        let mut forged = d.clone();
        // A forger raises the counter and keeps the old tag.
        forged[27] ^= 0x40;
        assert_eq!(
            b.open(&mut Envelope::new_checked(forged).unwrap())
                .unwrap_err(),
            OpenError::Authentication
        );
        b.open(&mut Envelope::new_checked(d).unwrap()).unwrap();
    }

    #[test]
    fn wrong_direction_key_fails() {
        let (mut a, _) = pair();
        let mut other = Session::new(9, 2, &keys(2, 3));
        let d = sealed(&mut a, b"x");
        assert_eq!(
            other
                .open(&mut Envelope::new_checked(d).unwrap())
                .unwrap_err(),
            OpenError::Authentication
        );
    }
}
