//! The order in which a layer pass drives the cache's state machine — lookups, demand loads,
//! what may be evicted, waiting, prefetches — written once and run by both the live provider
//! (loads on the I/O pool) and the trace-driven simulator (loads on a modelled disk). So with
//! the same events the two make the same cache decisions by construction; only how long a load
//! takes differs.
//!
//! A pass goes: [`begin_pass`] (land what has finished — or, settling, everything in flight —
//! count the activations in ascending expert order, start every missing load with the pass's
//! experts protected), then [`serve`] for each expert in ascending order (wait for it, or
//! reload it if it had to give way), with [`prefetch`] between passes.

use std::collections::BTreeMap;

use super::cache::{Admit, CacheCore, Lookup};
use super::policy::NextUse;
use super::{ExpertKey, KeySet};
use crate::error::{EngineError, Result};
use crate::observer::Phase;

/// How loads are carried out.
pub trait Loader {
    /// Starts reading `key` (its room is reserved; `evicted`, if any, just left the cache).
    fn start(&mut self, key: ExpertKey, prefetch: bool, evicted: Option<ExpertKey>) -> Result<()>;
    /// Lands the loads that have finished by now, without waiting.
    fn poll(&mut self, core: &mut CacheCore);
    /// Waits for the next load to finish and lands it; false if none is in flight. The wait
    /// is stall time.
    fn wait_one(&mut self, core: &mut CacheCore) -> Result<bool>;
    /// Why the last load of `key` failed, once (then it is forgotten).
    fn take_error(&mut self, _key: ExpertKey) -> Option<String> {
        None
    }
    /// The policy's view of the future (Belady, simulation only).
    fn future(&self) -> Option<&dyn NextUse> {
        None
    }
}

/// The state of one layer pass.
#[derive(Debug, Default, Clone)]
pub struct Pass {
    /// Every expert of the pass: what a prefetch arriving during (or right after) it may not
    /// evict.
    pub all: KeySet,
    /// Experts of the pass not handed out yet.
    pub pending: KeySet,
    /// Experts whose loads this pass started.
    pub loaded_here: KeySet,
    /// Experts that were not resident when the pass began (ascending).
    pub missing: Vec<ExpertKey>,
}

/// Reserves room for `key` and starts its load; false if it is already there or there is no
/// room now. A demand load (`pass` given) evicts none of the pass's pending experts with
/// `strict`; without it, only those whose loads this pass started stay protected (whether they
/// have landed is timing). A prefetch (`pass` None) evicts none of `protect`.
pub fn issue(
    core: &mut CacheCore,
    loader: &mut dyn Loader,
    pass: Option<&mut Pass>,
    protect: Option<&KeySet>,
    key: ExpertKey,
    strict: bool,
) -> Result<bool> {
    let prefetch = pass.is_none();
    let admit = {
        let (pending, here) = match &pass {
            Some(p) => (Some(&p.pending), Some(&p.loaded_here)),
            None => (None, None),
        };
        let guard = |k: ExpertKey| {
            let pend =
                pending.is_some_and(|p| p.contains(&k)) && (strict || here.is_some_and(|h| h.contains(&k)));
            pend || protect.is_some_and(|p| p.contains(&k))
        };
        core.admit(key, prefetch, &guard, loader.future())
    };
    match admit {
        Admit::Load { evicted } => {
            if let Some(p) = pass {
                p.loaded_here.insert(key);
            }
            loader.start(key, prefetch, evicted)?;
            Ok(true)
        }
        Admit::Present | Admit::NoRoom => Ok(false),
    }
}

/// Waits until `key` is no longer loading; its load's error, if it failed.
pub fn wait_for(core: &mut CacheCore, loader: &mut dyn Loader, key: ExpertKey) -> Result<()> {
    while core.is_loading(key) {
        if !loader.wait_one(core)? {
            break;
        }
    }
    match loader.take_error(key) {
        Some(msg) => Err(EngineError::invalid("expert load", msg)),
        None => Ok(()),
    }
}

/// Begins the pass of `layer` over the activations `counts` (expert → tokens of the pass that
/// route to it): lands finished loads (all loads in flight with `settle`), moves token time on
/// at the first MoE layer, counts the activations and starts every missing load.
pub fn begin_pass(
    core: &mut CacheCore,
    loader: &mut dyn Loader,
    layer: usize,
    phase: Phase,
    counts: &BTreeMap<u32, u64>,
    advance_tokens: Option<u64>,
    settle: bool,
) -> Result<Pass> {
    loader.poll(core);
    if settle {
        while loader.wait_one(core)? {}
    }
    if let Some(t) = advance_tokens {
        core.advance(t);
    }
    let all: KeySet = counts.keys().map(|&e| ExpertKey::new(layer, e)).collect();
    let mut pass = Pass {
        pending: all.clone(),
        all,
        ..Default::default()
    };
    for (&e, &count) in counts {
        let key = ExpertKey::new(layer, e);
        if core.lookup(key, count, phase) != Lookup::Hit {
            pass.missing.push(key);
        }
    }
    for i in 0..pass.missing.len() {
        let key = pass.missing[i];
        if !core.is_loading(key) {
            issue(core, loader, Some(&mut pass), None, key, true)?;
        }
    }
    Ok(pass)
}

/// Skip-on-miss: the pass's missing experts are dropped (counted as fallbacks) and no longer
/// protected. Returns them.
pub fn skip_missing(core: &mut CacheCore, pass: &mut Pass, counts: &BTreeMap<u32, u64>) -> Vec<ExpertKey> {
    let gone = pass.missing.clone();
    let dropped: u64 = gone
        .iter()
        .map(|k| counts.get(&k.expert).copied().unwrap_or(0))
        .sum();
    core.count_fallbacks(dropped);
    for k in &gone {
        pass.pending.remove(k);
    }
    gone
}

/// Makes `key` (an expert of the pass) resident: waits for its load, or — if it had to give
/// way — loads it again, giving up one of the pass's experts not handed out yet when there is
/// no other room. Then it is handed out (no longer pending).
pub fn serve(core: &mut CacheCore, loader: &mut dyn Loader, pass: &mut Pass, key: ExpertKey) -> Result<()> {
    loop {
        loader.poll(core);
        if core.is_resident(key) {
            break;
        }
        if core.is_loading(key) {
            loader.wait_one(core)?;
            continue;
        }
        // Its load failed (perhaps while this thread waited for another one): that stops the
        // pass, rather than a second read that might succeed hiding the fault.
        if let Some(msg) = loader.take_error(key) {
            return Err(EngineError::invalid("expert load", msg));
        }
        if issue(core, loader, Some(pass), None, key, true)?
            || issue(core, loader, Some(pass), None, key, false)?
        {
            continue;
        }
        if !loader.wait_one(core)? {
            return Err(EngineError::invalid(
                "--capacity",
                format!(
                    "no room to load {key}: every slot of its cache ({}) holds a pinned or in-use expert",
                    core.capacity_of(key)
                ),
            ));
        }
    }
    pass.pending.remove(&key);
    Ok(())
}

/// Starts loading `keys` ahead of need, behind every demand load; a prefetch evicts neither a
/// pinned expert nor one of `protect` (the experts of the layer pass running or
/// just run). Returns how many were started.
pub fn prefetch(
    core: &mut CacheCore,
    loader: &mut dyn Loader,
    protect: Option<&KeySet>,
    keys: &[ExpertKey],
) -> Result<usize> {
    loader.poll(core);
    let mut n = 0;
    for &key in keys {
        n += usize::from(issue(core, loader, None, protect, key, true)?);
    }
    Ok(n)
}
