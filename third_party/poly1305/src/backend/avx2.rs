//! AVX2 implementation of the Poly1305 state machine.

// The State struct and its logic was originally derived from Goll and Gueron's AVX2 C
// code:
//     [Vectorization of Poly1305 message authentication code](https://ieeexplore.ieee.org/document/7113463)
//
// which was sourced from Bhattacharyya and Sarkar's modified variant:
//     [Improved SIMD Implementation of Poly1305](https://eprint.iacr.org/2019/842)
//     https://github.com/Sreyosi/Improved-SIMD-Implementation-of-Poly1305
//
// The logic has been extensively rewritten and documented, and several bugs in the
// original C code were fixed.
//
// Note that State only implements the original Goll-Gueron algorithm, not the
// optimisations provided by Bhattacharyya and Sarkar. The latter require the message
// length to be known, which is incompatible with the streaming API of UniversalHash.
#![allow(unsafe_op_in_unsafe_fn)]

use universal_hash::{
    UhfBackend,
    array::Array,
    common::{BlockSizeUser, ParBlocksSizeUser},
    consts::{U4, U16},
};

use crate::{Block, Key, Tag};

mod helpers;
use self::helpers::*;

/// Four Poly1305 blocks (64-bytes)
type ParBlocks = universal_hash::ParBlocks<State>;

#[derive(Copy, Clone)]
struct Initialized {
    p: Aligned4x130,
    m: SpacedMultiplier4x130,
    r4: PrecomputedMultiplier,
}

#[derive(Clone)]
pub(crate) struct State {
    k: AdditionKey,
    r1: PrecomputedMultiplier,
    r2: PrecomputedMultiplier,
    initialized: Option<Initialized>,
    cached_blocks: [Block; 4],
    num_cached_blocks: usize,
    partial_block: Option<Block>,
}

impl State {
    /// Initialize Poly1305 [`State`] with the given key
    pub(crate) fn new(key: &Key) -> Self {
        // Prepare addition key and polynomial key.
        let (k, r1) = unsafe { prepare_keys(key) };

        // Precompute R^2. (shoal: inside an AVX2 function, so the vector helpers and the
        // intrinsics they call are inlined; in `new` itself, which is built without AVX2, they
        // were out-of-line calls costing ~500 ns per key.)
        #[target_feature(enable = "avx2")]
        unsafe fn square(r1: PrecomputedMultiplier) -> Aligned130 {
            (r1 * r1).reduce()
        }
        let r2 = unsafe { square(r1) };

        State {
            k,
            r1,
            r2: r2.into(),
            initialized: None,
            cached_blocks: [Block::default(); 4],
            num_cached_blocks: 0,
            partial_block: None,
        }
    }

    /// Process four Poly1305 blocks at once.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn compute_par_blocks(&mut self, blocks: &ParBlocks) {
        assert!(self.partial_block.is_none());
        assert_eq!(self.num_cached_blocks, 0);

        self.process_blocks(Aligned4x130::from_par_blocks(blocks));
    }

    /// Process four Poly1305 blocks that follow `num_cached_blocks` (1 to 3) cached ones.
    ///
    /// (shoal: the same grouping as four `compute_block` calls, without their per-block
    /// overhead: the cache is filled to four from the front of `blocks`, that group goes
    /// through `process_blocks`, and the rest of `blocks` becomes the cache, leaving
    /// `num_cached_blocks` as it was. No arithmetic changes.)
    #[target_feature(enable = "avx2")]
    unsafe fn compute_par_blocks_unaligned(&mut self, blocks: &ParBlocks) {
        let cached = self.num_cached_blocks;
        debug_assert!((1..4).contains(&cached));
        let fill = 4 - cached;
        self.cached_blocks[cached..].copy_from_slice(&blocks[..fill]);
        self.process_blocks(Aligned4x130::from_blocks(&self.cached_blocks));
        self.cached_blocks[..cached].copy_from_slice(&blocks[fill..]);
    }

    /// Compute a Poly1305 block
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn compute_block(&mut self, block: &Block, partial: bool) {
        // We can cache a single partial block.
        if partial {
            assert!(self.partial_block.is_none());
            self.partial_block = Some(*block);
            return;
        }

        self.cached_blocks[self.num_cached_blocks].copy_from_slice(block);
        if self.num_cached_blocks < 3 {
            self.num_cached_blocks += 1;
            return;
        } else {
            self.num_cached_blocks = 0;
        }

        self.process_blocks(Aligned4x130::from_blocks(&self.cached_blocks));
    }

    /// Compute a Poly1305 block
    #[target_feature(enable = "avx2")]
    unsafe fn process_blocks(&mut self, blocks: Aligned4x130) {
        if let Some(inner) = &mut self.initialized {
            // P <-- R^4 * P + blocks
            inner.p = (&inner.p * inner.r4).reduce() + blocks;
        } else {
            // Initialize the polynomial.
            let p = blocks;

            // Initialize the multiplier (used to merge down the polynomial during
            // finalization).
            let (m, r4) = SpacedMultiplier4x130::new(self.r1, self.r2);

            self.initialized = Some(Initialized { p, m, r4 });
        }
    }

    /// Finalize output producing a [`Tag`]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn finalize(&mut self) -> Tag {
        assert!(self.num_cached_blocks < 4);
        let mut data = &self.cached_blocks[..];

        // T ← R◦T
        // P = T_0 + T_1 + T_2 + T_3
        let mut p = self
            .initialized
            .take()
            .map(|inner| (inner.p * inner.m).sum().reduce());

        if self.num_cached_blocks >= 2 {
            // Compute 32 byte block (remaining data < 64 bytes)
            let mut c = Aligned2x130::from_blocks(data[..2].try_into().unwrap());
            if let Some(p) = p {
                c = c + p;
            }
            p = Some(c.mul_and_sum(self.r1, self.r2).reduce());
            data = &data[2..];
            self.num_cached_blocks -= 2;
        }

        if self.num_cached_blocks == 1 {
            // Compute 16 byte block (remaining data < 32 bytes)
            let mut c = Aligned130::from_block(&data[0]);
            if let Some(p) = p {
                c = c + p;
            }
            p = Some((c * self.r1).reduce());
            self.num_cached_blocks -= 1;
        }

        if let Some(block) = &self.partial_block {
            // Compute last block (remaining data < 16 bytes)
            let mut c = Aligned130::from_partial_block(block);
            if let Some(p) = p {
                c = c + p;
            }
            p = Some((c * self.r1).reduce());
        }

        // Compute tag: p + k mod 2^128
        let mut tag = Array::<u8, _>::default();
        let tag_int = if let Some(p) = p {
            self.k + p
        } else {
            self.k.into()
        };
        tag_int.write(tag.as_mut_slice());

        tag
    }
}

impl BlockSizeUser for State {
    type BlockSize = U16;
}

impl ParBlocksSizeUser for State {
    type ParBlocksSize = U4;
}

impl UhfBackend for State {
    fn proc_block(&mut self, block: &Block) {
        unsafe { self.compute_block(block, false) };
    }

    fn proc_par_blocks(&mut self, blocks: &ParBlocks) {
        if self.num_cached_blocks == 0 {
            // Fast path.
            unsafe { self.compute_par_blocks(blocks) };
        } else {
            // We are unaligned. (shoal: four blocks at once through the cache, not the
            // upstream per-block fallback, which every 4-block group after an AAD of 1-3
            // blocks took.)
            unsafe { self.compute_par_blocks_unaligned(blocks) };
        }
    }

    fn blocks_needed_to_align(&self) -> usize {
        if self.num_cached_blocks == 0 {
            // There are no cached blocks; fast path is available.
            0
        } else {
            // There are cached blocks; report how many more we need.
            self.cached_blocks.len() - self.num_cached_blocks
        }
    }
}

// shoal: the AVX2 backend against the portable one when fed as `chacha20poly1305` feeds it
// (`update_padded` over the AAD, again over the message, then the lengths block), over every
// AAD length from 0 to 69 bytes and every message length from 0 to 599, so every number of
// cached blocks meets `proc_par_blocks`.
#[cfg(test)]
mod shoal_tests {
    extern crate std;

    use super::{ParBlocks, State};
    use crate::{Block, Key, backend::soft};
    use universal_hash::UhfBackend;

    /// What `UniversalHash::update_padded` does with `data`: whole four-block groups through
    /// `proc_par_blocks`, the other blocks and the zero-padded tail through `proc_block`. The
    /// portable backend takes the same blocks one at a time.
    fn update_padded(avx2: &mut State, soft: &mut soft::State, data: &[u8]) {
        let (blocks, tail) = Block::slice_as_chunks(data);
        let (groups, rest) = ParBlocks::slice_as_chunks(blocks);
        for group in groups {
            avx2.proc_par_blocks(group);
        }
        for block in rest {
            avx2.proc_block(block);
        }
        for block in blocks {
            soft.proc_block(block);
        }
        if !tail.is_empty() {
            let mut padded = Block::default();
            padded[..tail.len()].copy_from_slice(tail);
            avx2.proc_block(&padded);
            soft.proc_block(&padded);
        }
    }

    #[test]
    fn unaligned_par_blocks_match_portable_backend() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        // xorshift64: deterministic bytes, no dependency
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let bytes: std::vec::Vec<u8> = (0..700).map(|_| next()).collect();
        for aad_len in 0..70 {
            for msg_len in 0..600 {
                let mut key = Key::default();
                key.iter_mut().for_each(|b| *b = next());
                let aad = &bytes[..aad_len];
                let msg = &bytes[100..100 + msg_len];
                let mut avx2 = State::new(&key);
                let mut soft = soft::State::new(&key);
                update_padded(&mut avx2, &mut soft, aad);
                update_padded(&mut avx2, &mut soft, msg);
                let mut lengths = Block::default();
                lengths[..8].copy_from_slice(&(aad_len as u64).to_le_bytes());
                lengths[8..].copy_from_slice(&(msg_len as u64).to_le_bytes());
                avx2.proc_block(&lengths);
                soft.proc_block(&lengths);
                assert_eq!(
                    unsafe { avx2.finalize() },
                    soft.finalize(),
                    "AAD {aad_len} bytes, message {msg_len} bytes"
                );
            }
        }
    }
}
