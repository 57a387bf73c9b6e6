//! Ingest pacing: the credit a throttled VM's connections may be granted, from a token bucket per
//! VM fed by the VM's own throttle and by a weighted fair share of the global one.
//!
//! The server never drops or delays a received record for a throttle: it grants credit more
//! slowly, so the agent sends more slowly and keeps its dirty bits (its RPO grows). Without any
//! throttle the pacer is not consulted and credit flows as before ([`crate::conn::fair_share`]).
//!
//! Fair share (weighted max-min, "water filling"): every refill, the tokens the global rate
//! produced are split among the VMs that asked for credit in the last [`ACTIVE_FOR`], in
//! proportion to their weights, each capped by its own throttle and by its bucket's room; what a
//! VM cannot take (it is capped, or it sends less than its share, so its bucket is full) goes to
//! the others. A churning VM therefore cannot starve a small one: the small one gets what it
//! sends, up to its weighted share.
//!
//! Bursts: a bucket holds at most [`BURST`] of its rate (at least [`MIN_BURST`]), and a
//! connection holds at most [`Pacer::window`] of granted-but-unacknowledged credit, so the rate
//! seen on the wire follows the setting within a fraction of a second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_wire::MAX_FRAME;

/// A bucket holds this much time of its rate.
pub const BURST: Duration = Duration::from_millis(250);
/// The least a bucket holds.
pub const MIN_BURST: u64 = 256 << 10;
/// A VM that asked for credit this recently takes part in the global share.
pub const ACTIVE_FOR: Duration = Duration::from_millis(500);
/// Tokens never accrue for more than this at once (a stalled refill does not become a burst).
const MAX_STEP: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Bucket {
    /// The VM's own throttle now, bytes/s.
    cap: Option<u64>,
    weight: u32,
    tokens: f64,
    asked: Option<Instant>,
    /// When a request was last cut short (the VM is being held back).
    short: Option<Instant>,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            cap: None,
            weight: 1,
            tokens: 0.0,
            asked: None,
            short: None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    global: Option<u64>,
    last: Instant,
    vms: HashMap<String, Bucket>,
}

/// The ingest pacer of one server.
#[derive(Debug)]
pub struct Pacer {
    inner: Mutex<Inner>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            inner: Mutex::new(Inner {
                global: None,
                last: Instant::now(),
                vms: HashMap::new(),
            }),
        }
    }
}

/// What the pacer applies to one VM, for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPace {
    /// The VM's own throttle.
    pub cap: Option<u64>,
    pub weight: u32,
    /// Held back by a throttle within the last second.
    pub throttled: bool,
}

fn burst(rate: u64) -> f64 {
    (rate as f64 * BURST.as_secs_f64()).max(MIN_BURST as f64)
}

impl Inner {
    fn effective(&self, b: &Bucket) -> Option<u64> {
        match (self.global, b.cap) {
            (None, c) => c,
            (g, None) => g,
            (Some(g), Some(c)) => Some(g.min(c)),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now
            .saturating_duration_since(self.last)
            .min(MAX_STEP)
            .as_secs_f64();
        self.last = now;
        if dt <= 0.0 {
            return;
        }
        let global = self.global;
        // Room of each bucket for this step: its own rate's tokens, up to its burst.
        let mut room: Vec<(&mut Bucket, f64)> = Vec::new();
        for b in self.vms.values_mut() {
            let eff = match (global, b.cap) {
                (None, c) => c,
                (g, None) => g,
                (Some(g), Some(c)) => Some(g.min(c)),
            };
            let Some(eff) = eff else {
                b.tokens = 0.0;
                continue;
            };
            let full = burst(eff);
            let mut r = (full - b.tokens).max(0.0);
            if let Some(c) = b.cap {
                r = r.min(c as f64 * dt);
            }
            if global.is_none() {
                // Only its own throttle: it fills at its own rate.
                b.tokens += r;
                continue;
            }
            let active = b.asked.is_some_and(|t| now.duration_since(t) < ACTIVE_FOR);
            if active && r > 0.0 {
                room.push((b, r));
            }
        }
        let Some(g) = global else { return };
        // Water filling of the global tokens among the active VMs by weight.
        let mut pool = g as f64 * dt;
        while pool > 1e-6 && !room.is_empty() {
            let weights: f64 = room.iter().map(|(b, _)| f64::from(b.weight)).sum();
            let mut used = 0.0;
            for (b, r) in room.iter_mut() {
                let give = (pool * f64::from(b.weight) / weights).min(*r);
                b.tokens += give;
                *r -= give;
                used += give;
            }
            pool -= used;
            room.retain(|(_, r)| *r > 1e-6);
            if used <= 1e-6 {
                break;
            }
        }
    }
}

impl Pacer {
    /// Applies the throttles in effect now: the global ingest rate, each VM's own rate and weight
    /// (VMs not named have neither).
    pub fn set(&self, global: Option<u64>, vms: &HashMap<String, (Option<u64>, u32)>) {
        let mut i = self.inner.lock().expect("pacer lock");
        i.refill(Instant::now());
        i.global = global;
        for (vm, b) in i.vms.iter_mut() {
            let (cap, weight) = vms.get(vm).copied().unwrap_or((None, 1));
            b.cap = cap;
            b.weight = weight.max(1);
        }
        for (vm, (cap, weight)) in vms {
            i.vms.entry(vm.clone()).or_insert_with(|| Bucket {
                cap: *cap,
                weight: (*weight).max(1),
                ..Bucket::new()
            });
        }
        // Forget idle VMs without a setting.
        i.vms.retain(|vm, b| {
            vms.contains_key(vm)
                || b.asked
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        });
    }

    /// Whether `vm`'s credit is paced (a global or its own throttle applies).
    pub fn limited(&self, vm: &str) -> bool {
        let i = self.inner.lock().expect("pacer lock");
        i.global.is_some() || i.vms.get(vm).is_some_and(|b| b.cap.is_some())
    }

    /// Whether any throttle applies to ingest.
    pub fn any(&self) -> bool {
        let i = self.inner.lock().expect("pacer lock");
        i.global.is_some() || i.vms.values().any(|b| b.cap.is_some())
    }

    /// The most credit one of `vm`'s connections may hold unacknowledged while paced: a quarter
    /// second of its rate, at least one largest frame (so any record can be sent).
    pub fn window(&self, vm: &str) -> u64 {
        let i = self.inner.lock().expect("pacer lock");
        let eff = i.vms.get(vm).map_or(i.global, |b| i.effective(b));
        eff.map_or(u64::MAX, |r| (burst(r) as u64).max(MAX_FRAME))
    }

    /// Takes up to `want` bytes of credit for `vm` now; returns what may be granted (all of it
    /// when no throttle applies).
    pub fn take(&self, vm: &str, want: u64) -> u64 {
        let now = Instant::now();
        let mut i = self.inner.lock().expect("pacer lock");
        let global = i.global;
        let b = i.vms.entry(vm.to_owned()).or_insert_with(Bucket::new);
        if global.is_none() && b.cap.is_none() {
            return want;
        }
        b.asked = Some(now);
        i.refill(now);
        let b = i.vms.get_mut(vm).expect("inserted above");
        let give = (b.tokens.max(0.0) as u64).min(want);
        b.tokens -= give as f64;
        if give < want {
            b.short = Some(now);
        }
        give
    }

    /// What applies to each VM the pacer knows.
    pub fn snapshot(&self) -> HashMap<String, VmPace> {
        let i = self.inner.lock().expect("pacer lock");
        i.vms
            .iter()
            .map(|(vm, b)| {
                (
                    vm.clone(),
                    VmPace {
                        cap: b.cap,
                        weight: b.weight,
                        throttled: b
                            .short
                            .is_some_and(|t| t.elapsed() < Duration::from_secs(1)),
                    },
                )
            })
            .collect()
    }

    /// The global ingest rate in effect.
    pub fn global(&self) -> Option<u64> {
        self.inner.lock().expect("pacer lock").global
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `vms` (name, bytes each wants per 10 ms step) for `secs` of simulated time through
    /// the real clock-free refill and returns the bytes each got.
    fn run(p: &Pacer, vms: &[(&str, u64)], secs: f64) -> HashMap<String, u64> {
        let mut got: HashMap<String, u64> = HashMap::new();
        let start = Instant::now();
        {
            let mut i = p.inner.lock().unwrap();
            i.last = start;
        }
        let steps = (secs * 100.0) as u32;
        for s in 1..=steps {
            let now = start + Duration::from_millis(10) * s;
            for (vm, want) in vms {
                let mut i = p.inner.lock().unwrap();
                let global = i.global;
                let b = i.vms.entry(vm.to_string()).or_insert_with(Bucket::new);
                if global.is_none() && b.cap.is_none() {
                    *got.entry(vm.to_string()).or_default() += want;
                    continue;
                }
                b.asked = Some(now);
                i.refill(now);
                let b = i.vms.get_mut(*vm).unwrap();
                let give = (b.tokens.max(0.0) as u64).min(*want);
                b.tokens -= give as f64;
                *got.entry(vm.to_string()).or_default() += give;
            }
        }
        got
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn a_global_rate_is_split_fairly_and_unused_share_goes_to_others() {
        let p = Pacer::default();
        p.set(Some(50 * MB), &HashMap::new());
        // A churner that wants 2 MiB every 10 ms (200 MiB/s) and a VM sending 5 MiB/s.
        let got = run(&p, &[("churn", 2 * MB), ("small", 50 << 10)], 20.0);
        let (churn, small) = (got["churn"] as f64 / 20.0, got["small"] as f64 / 20.0);
        // The small VM gets all it sends; the churner the rest.
        assert!(
            (small / (5.0 * MB as f64) - 1.0).abs() < 0.03,
            "small {small}"
        );
        let total = churn + small;
        assert!(
            (total / (50.0 * MB as f64) - 1.0).abs() < 0.03,
            "total {total}"
        );
    }

    #[test]
    fn equal_churners_share_by_weight_and_own_caps_hold() {
        let p = Pacer::default();
        let mut vms = HashMap::new();
        vms.insert("heavy".to_string(), (None, 3));
        vms.insert("capped".to_string(), (Some(4 * MB), 1));
        p.set(Some(40 * MB), &vms);
        let got = run(
            &p,
            &[("heavy", 2 * MB), ("light", 2 * MB), ("capped", 2 * MB)],
            20.0,
        );
        let r = |vm: &str| got[vm] as f64 / 20.0 / MB as f64;
        // capped takes its 4; heavy and light split the other 36 as 3:1.
        assert!((r("capped") - 4.0).abs() < 0.15, "capped {}", r("capped"));
        assert!((r("heavy") - 27.0).abs() < 0.8, "heavy {}", r("heavy"));
        assert!((r("light") - 9.0).abs() < 0.5, "light {}", r("light"));
    }

    #[test]
    fn a_vm_cap_alone_paces_only_that_vm() {
        let p = Pacer::default();
        let mut vms = HashMap::new();
        vms.insert("web".to_string(), (Some(20 * MB), 1));
        p.set(None, &vms);
        assert!(p.limited("web") && !p.limited("db"));
        let got = run(&p, &[("web", 2 * MB), ("db", 2 * MB)], 10.0);
        let web = got["web"] as f64 / 10.0 / MB as f64;
        assert!((web - 20.0).abs() < 0.5, "web {web}");
        assert_eq!(got["db"], 2 * MB * 1000);
        assert_eq!(p.window("db"), u64::MAX);
        assert_eq!(p.window("web"), (5 * MB).max(MAX_FRAME));
    }
}
