//! A circuit breaker for calls to another system: a partner's webhook, the rate limiter's Redis.
//!
//! Prevents: a dependency that is down or hanging from making every call wait out its timeout,
//! adding that wait to work here while the dependency is failing anyway. After `threshold`
//! consecutive failures the circuit opens and calls fail at once for `cooldown`; then one trial
//! call decides whether it closes again. Each caller decides what failing at once means: the
//! webhook hands its notification back to the queue, the rate limiter uses this process's
//! buckets. Written here (60 lines) rather than taken from apalis: its worker-level breaker (1.0)
//! ignores its configured thresholds, and it would count every job error, not the dependency's.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct CircuitBreaker {
    /// The gauge that reads 1 while the circuit is open.
    gauge: &'static str,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
}

/// What [`CircuitBreaker::allow`] let through: a call on a closed circuit, or the one trial
/// call of a half-open one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Closed,
    Trial,
}

/// The circuit is open: the call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the circuit is open after {failures} failures in a row")]
pub struct Open {
    pub failures: u32,
    /// When the circuit lets a trial call through.
    pub retry_in: Duration,
}

impl CircuitBreaker {
    pub fn new(gauge: &'static str, threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            gauge,
            threshold,
            cooldown,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain values, valid whatever a panicking holder left.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call may be made now. Call [`record`](Self::record) with its outcome after.
    pub fn allow(&self) -> Result<Permit, Open> {
        let mut state = self.state();
        match state.open_until {
            Some(until) if Instant::now() < until => Err(Open {
                failures: state.failures,
                retry_in: until - Instant::now(),
            }),
            Some(_) => {
                // Half-open: this call is the trial; until it ends, others are refused.
                state.open_until = Some(Instant::now() + self.cooldown);
                Ok(Permit::Trial)
            }
            None => Ok(Permit::Closed),
        }
    }

    /// Ends a call without a verdict on the dependency. If it was the trial, the next call is
    /// the trial again; any other call leaves the circuit as it is.
    pub fn release(&self, permit: Permit) {
        let mut state = self.state();
        if permit == Permit::Trial && state.open_until.is_some() {
            state.open_until = Some(Instant::now());
        }
    }

    pub fn record(&self, success: bool) {
        let mut state = self.state();
        if success {
            *state = State::default();
        } else {
            state.failures += 1;
            if state.failures >= self.threshold {
                if state.open_until.is_none() {
                    tracing::warn!(
                        failures = state.failures,
                        circuit = self.gauge,
                        "circuit opened"
                    );
                }
                state.open_until = Some(Instant::now() + self.cooldown);
            }
        }
        metrics::gauge!(self.gauge).set(if state.open_until.is_some() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_lets_one_trial_through() {
        // Cooldowns long enough that a busy machine's scheduling cannot end one between two
        // lines of this test.
        let breaker = CircuitBreaker::new("test_circuit_open", 2, Duration::from_millis(500));
        breaker.record(false);
        assert!(
            breaker.allow().is_ok(),
            "one failure is below the threshold"
        );
        breaker.record(false);
        assert!(matches!(breaker.allow(), Err(Open { failures: 2, .. })));
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            breaker.allow(),
            Ok(Permit::Trial),
            "the trial after the cooldown"
        );
        assert!(breaker.allow().is_err(), "only one trial at a time");
        breaker.release(Permit::Closed);
        assert!(
            breaker.allow().is_err(),
            "a call that was not the trial gives nothing back"
        );
        breaker.release(Permit::Trial);
        assert_eq!(
            breaker.allow(),
            Ok(Permit::Trial),
            "a trial given back is the next call's"
        );
        breaker.record(false);
        assert!(breaker.allow().is_err(), "a failed trial opens it again");
        std::thread::sleep(Duration::from_millis(600));
        assert!(breaker.allow().is_ok());
        breaker.record(true);
        assert!(breaker.allow().is_ok(), "a good trial closes it");
        assert!(breaker.allow().is_ok());
    }
}
