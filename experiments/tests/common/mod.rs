//! What the fuzz tests of this crate share: the case budget and reproducible random numbers.

#![allow(dead_code)]

/// Mutation cases per fuzzed file: `SHADOWMOE_FUZZ_CASES`, else `default`.
pub fn fuzz_cases(default: usize) -> usize {
    std::env::var("SHADOWMOE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64, as a closure giving the next number.
pub fn splitmix(seed: u64) -> impl FnMut() -> usize {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as usize
    }
}
