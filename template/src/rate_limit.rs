//! Rate limiting with GCRA (the `governor` crate): the login policy.
//!
//! Prevents: password guessing, credential stuffing, and login storms that burn CPU on argon2.
//! Every login attempt spends one token from two buckets, the client IP's and the account name's
//! (whether or not the account exists, so the limit reveals nothing), before any password work
//! is done. Past either limit the answer is 429 `rate_limited` with `Retry-After`.
//!
//! The buckets live in this process: with several instances each enforces its own share. The
//! per-principal, per-route and shared (Redis) policies come with the protection work.

use std::net::IpAddr;
use std::num::NonZeroU32;

use axum::http::{HeaderValue, header};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::problem::{ErrorCode, Problem};

pub struct LoginLimiter {
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_account: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginLimiter")
    }
}

impl LoginLimiter {
    /// `per_ip` and `per_account` attempts per minute, each allowed as a burst.
    pub fn new(per_ip: NonZeroU32, per_account: NonZeroU32) -> Self {
        LoginLimiter {
            per_ip: RateLimiter::keyed(Quota::per_minute(per_ip)),
            per_account: RateLimiter::keyed(Quota::per_minute(per_account)),
        }
    }

    /// Spends one attempt for `ip` and for `account` (compared case-insensitively), or answers
    /// 429 with the seconds until the next attempt is allowed.
    pub fn check(&self, ip: IpAddr, account: &str) -> Result<(), Problem> {
        let account = account.trim().to_lowercase();
        let outcome = self
            .per_ip
            .check_key(&ip)
            .and_then(|()| self.per_account.check_key(&account));
        outcome.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Problem::new(
                ErrorCode::RateLimited,
                "Too many login attempts; wait before trying again.",
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
        })
    }

    /// Forgets buckets that are full again, so memory does not grow with every IP ever seen.
    pub fn forget_idle(&self) {
        self.per_ip.retain_recent();
        self.per_account.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bucket_limits_on_its_own() {
        let limiter = LoginLimiter::new(NonZeroU32::new(3).unwrap(), NonZeroU32::new(2).unwrap());
        let ip = IpAddr::from([10, 0, 0, 1]);
        assert!(limiter.check(ip, "ann@example.com").is_ok());
        assert!(limiter.check(ip, "ANN@example.com ").is_ok());
        let limited = limiter.check(ip, "ann@example.com").unwrap_err();
        assert_eq!(limited.code(), ErrorCode::RateLimited);
        // The IP has one attempt left for another account, then it is limited too.
        assert!(
            limiter
                .check(IpAddr::from([10, 0, 0, 2]), "bob@example.com")
                .is_ok()
        );
        let other_ip = IpAddr::from([10, 0, 0, 9]);
        assert!(
            limiter.check(other_ip, "ann@example.com").is_err(),
            "the account is limited from any IP"
        );
    }
}
