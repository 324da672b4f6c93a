//! A CPU ruler: a fixed arithmetic loop, timed before every run of a scenario and after
//! the last, so a reader of a figure sees how much CPU the machine gave the process while
//! it was measured.
//!
//! These machines are shared: the host's CPU contention changes a figure by 2x between two
//! runs, and a median of a few runs cannot hide a stretch of contention. The loop does the
//! same work every time (a dependent chain of multiply-xorshift steps that stays in
//! registers: no memory, no branch mispredictions, no system calls), so its time moves
//! only with the share and frequency of the CPU the process got. A scenario whose ruler
//! times spread by more than [`SPREAD_WARN`] was measured on a machine that moved under
//! it; `vmmu bench` and the report say so.

use std::hint::black_box;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Steps of the loop: about a millisecond on a 2020s core.
const STEPS: u64 = 1 << 20;

/// A ruler spread above this is reported as a machine that moved during the scenario.
pub const SPREAD_WARN: f64 = 1.5;

/// The ruler's times over one scenario's runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ruler {
    /// The fastest time of the loop, in microseconds.
    pub min_us: f64,
    /// The slowest.
    pub max_us: f64,
    /// How many times it was timed.
    pub samples: u32,
}

impl Ruler {
    /// `max_us / min_us`: 1 on a machine that gave the process the same CPU throughout.
    pub fn spread(&self) -> f64 {
        self.max_us / self.min_us
    }

    /// Whether the machine moved more than [`SPREAD_WARN`] during the scenario.
    pub fn moved(&self) -> bool {
        self.spread() > SPREAD_WARN
    }
}

/// Collects ruler times.
#[derive(Debug, Default)]
pub struct RulerTimes(Vec<f64>);

impl RulerTimes {
    /// Time the loop once and keep the time.
    pub fn tick(&mut self) {
        self.0.push(time_loop());
    }

    /// The times so far; `None` before the first tick.
    pub fn ruler(&self) -> Option<Ruler> {
        let min = self.0.iter().copied().reduce(f64::min)?;
        let max = self.0.iter().copied().reduce(f64::max)?;
        Some(Ruler {
            min_us: min,
            max_us: max,
            samples: self.0.len() as u32,
        })
    }
}

/// One timing of the loop, in microseconds.
fn time_loop() -> f64 {
    let t = Instant::now();
    let mut x = black_box(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..STEPS {
        x = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        x ^= x >> 29;
    }
    black_box(x);
    t.elapsed().as_nanos() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_max_over_min() {
        let r = Ruler {
            min_us: 2.0,
            max_us: 3.2,
            samples: 4,
        };
        assert!((r.spread() - 1.6).abs() < 1e-12);
        assert!(r.moved());
        let still = Ruler { max_us: 2.5, ..r };
        assert!(!still.moved());
    }

    #[test]
    fn no_ticks_no_ruler_and_ticks_are_counted() {
        let mut t = RulerTimes::default();
        assert_eq!(t.ruler(), None);
        t.tick();
        t.tick();
        let r = t.ruler().unwrap();
        assert_eq!(r.samples, 2);
        assert!(r.min_us > 0.0 && r.min_us <= r.max_us);
    }
}
