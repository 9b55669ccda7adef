//! Rate limiting with GCRA: per principal (per client IP when anonymous), stricter for writes and
//! for login, in this process or shared through Redis.
//!
//! Prevents: one client (a bug, a scraper, a credential-stuffing run) taking the service from
//! everyone else. Every `/v1` request spends a token from its caller's `default` bucket, writes
//! also from the `writes` bucket, and login attempts from the client IP's and the account name's
//! `login` buckets before any password work. Past a limit the answer is 429 `rate_limited` with
//! an integer `Retry-After`; every `/v1` response carries `RateLimit-Policy` and `RateLimit`
//! (draft-ietf-httpapi-ratelimit-headers).
//!
//! GCRA (a token bucket stored as one timestamp per key): emission interval T = window / quota,
//! burst tolerance τ = T·(quota − 1); allow when now ≥ TAT − τ, then TAT = max(TAT, now) + T.
//! In-process buckets use `governor`; with `REDIS_URL` set, buckets live in Redis and one Lua
//! script makes each decision atomically, using Redis' clock, so several instances share them.
//! If Redis cannot answer within `REDIS_TIMEOUT_MS`, the decision falls back to this process's
//! own buckets: limits keep holding per instance rather than failing open or taking the API down
//! with Redis (logged, and counted in `rate_limit_backend_errors_total`). After
//! `REDIS_BREAKER_FAILURES` failures in a row a circuit breaker stops asking Redis for
//! `REDIS_BREAKER_COOLDOWN`, so a hanging Redis does not add its timeout to every request.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Governor};
use redis::aio::ConnectionManager;

use crate::auth::Principal;
use crate::circuit_breaker::CircuitBreaker;
use crate::client_ip::ClientIp;
use crate::config::RateLimitConfig;
use crate::problem::{ErrorCode, Problem};

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const REJECTIONS: &str = "rate_limit_rejections_total";
pub const BACKEND_ERRORS: &str = "rate_limit_backend_errors_total";
pub const CIRCUIT_OPEN: &str = "rate_limit_redis_circuit_open";

/// Redis failures in a row that open its circuit: enough that one lost packet does not.
const REDIS_BREAKER_FAILURES: u32 = 3;
/// How long decisions stay local before one is tried on Redis again.
const REDIS_BREAKER_COOLDOWN: Duration = Duration::from_secs(5);

/// One named limit: `quota` requests per `window`, all of which may come at once.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: &'static str,
    pub quota: NonZeroU32,
    pub window: Duration,
}

impl Policy {
    fn per_minute(name: &'static str, quota: NonZeroU32) -> Policy {
        Policy {
            name,
            quota,
            window: Duration::from_secs(60),
        }
    }

    fn emission_interval(&self) -> Duration {
        self.window / self.quota.get()
    }

    /// Appends `"default";q=600;w=60` (a `RateLimit-Policy` item) to `out`.
    fn write_item(&self, out: &mut String) {
        let _ = write!(
            out,
            "\"{}\";q={};w={}",
            self.name,
            self.quota,
            self.window.as_secs()
        );
    }
}

/// The outcome of spending one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still allowed right now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the next request is allowed (zero when allowed).
    pub retry_after: Duration,
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

type Buckets = DefaultKeyedRateLimiter<String, StateInformationMiddleware>;

/// This process's buckets, one keyed limiter per policy.
struct LocalStore {
    by_policy: HashMap<&'static str, Buckets>,
}

impl LocalStore {
    fn new(policies: &[&Policy]) -> Self {
        let by_policy = policies
            .iter()
            .map(|policy| {
                let quota = Quota::with_period(policy.emission_interval())
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(policy.quota);
                (
                    policy.name,
                    Governor::keyed(quota).with_middleware::<StateInformationMiddleware>(),
                )
            })
            .collect();
        LocalStore { by_policy }
    }

    fn decide(&self, policy: &Policy, key: &str) -> Decision {
        let Some(buckets) = self.by_policy.get(policy.name) else {
            // Every policy is registered in `RateLimiter::new`; an unknown one limits nothing.
            return Decision {
                allowed: true,
                remaining: policy.quota.get(),
                reset: Duration::ZERO,
                retry_after: Duration::ZERO,
            };
        };
        let interval = policy.emission_interval();
        match buckets.check_key(&key.to_owned()) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    remaining,
                    reset: interval * (policy.quota.get() - remaining),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(buckets.clock().now());
                // On a denial `t` is when the next request is allowed, so that `Retry-After` is
                // never earlier than `t`, as the RateLimit draft requires.
                Decision {
                    allowed: false,
                    remaining: 0,
                    reset: retry_after,
                    retry_after,
                }
            }
        }
    }

    fn forget_idle(&self) {
        for buckets in self.by_policy.values() {
            buckets.retain_recent();
        }
    }
}

/// GCRA in one atomic step, in microseconds (exact in Lua's doubles for centuries, and fine
/// enough for any quota). Returns {allowed, remaining, reset_us, retry_after_us}.
const GCRA_SCRIPT: &str = r"
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000000 + now_parts[2]
local interval = tonumber(ARGV[1])
local quota = tonumber(ARGV[2])
local tolerance = interval * (quota - 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if now < tat - tolerance then
  return {0, 0, tat - tolerance - now, tat - tolerance - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
local remaining = math.floor((now + tolerance - new_tat) / interval) + 1
if remaining < 0 then remaining = 0 end
return {1, remaining, new_tat - now, 0}
";

struct RedisStore {
    connection: ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    breaker: CircuitBreaker,
}

impl RedisStore {
    /// `Ok(None)` when the circuit is open: Redis was not asked.
    async fn decide(&self, policy: &Policy, key: &str) -> anyhow::Result<Option<Decision>> {
        if self.breaker.allow().is_err() {
            return Ok(None);
        }
        let reply = self.call(policy, key).await;
        self.breaker.record(reply.is_ok());
        reply.map(Some)
    }

    async fn call(&self, policy: &Policy, key: &str) -> anyhow::Result<Decision> {
        let mut connection = self.connection.clone();
        let mut invocation = self
            .script
            .key(format!("{}:{}:{key}", self.prefix, policy.name));
        let interval_us = u64::try_from(policy.emission_interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        invocation.arg(interval_us).arg(policy.quota.get());
        let reply: (u8, u32, u64, u64) =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection)).await??;
        let (allowed, remaining, reset_us, retry_us) = reply;
        Ok(Decision {
            allowed: allowed == 1,
            remaining,
            reset: Duration::from_micros(reset_us),
            retry_after: Duration::from_micros(retry_us),
        })
    }
}

/// The limits and where their buckets live. Shared by the middleware and the login handler.
pub struct RateLimiter {
    pub default: Policy,
    pub writes: Policy,
    pub login_per_ip: Policy,
    pub login_per_account: Policy,
    local: LocalStore,
    redis: Option<RedisStore>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("default", &self.default)
            .field("shared", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Builds the limiter; with a Redis URL the connection is made lazily, so the service starts
    /// (and falls back to local buckets) while Redis is down.
    pub fn new(config: &RateLimitConfig) -> anyhow::Result<Self> {
        let default = Policy::per_minute("default", config.per_minute);
        let writes = Policy::per_minute("writes", config.writes_per_minute);
        let login_per_ip = Policy::per_minute("login_ip", config.login_per_ip);
        let login_per_account = Policy::per_minute("login_account", config.login_per_account);
        let local = LocalStore::new(&[&default, &writes, &login_per_ip, &login_per_account]);
        let redis = match &config.redis_url {
            None => None,
            Some(url) => {
                let client = redis::Client::open(secrecy::ExposeSecret::expose_secret(url))?;
                let manager_config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.redis_timeout))
                    .set_response_timeout(Some(config.redis_timeout))
                    .set_number_of_retries(1);
                Some(RedisStore {
                    connection: ConnectionManager::new_lazy_with_config(client, manager_config)?,
                    script: redis::Script::new(GCRA_SCRIPT),
                    prefix: config.redis_prefix.clone(),
                    timeout: config.redis_timeout,
                    breaker: CircuitBreaker::new(
                        CIRCUIT_OPEN,
                        REDIS_BREAKER_FAILURES,
                        REDIS_BREAKER_COOLDOWN,
                    ),
                })
            }
        };
        Ok(RateLimiter {
            default,
            writes,
            login_per_ip,
            login_per_account,
            local,
            redis,
        })
    }

    /// Spends one token of `policy` for `key`.
    pub async fn decide(&self, policy: &Policy, key: &str) -> Decision {
        if let Some(redis) = &self.redis {
            match redis.decide(policy, key).await {
                Ok(Some(decision)) => return decision,
                // The circuit is open: counted when it opened, and its gauge says so.
                Ok(None) => {}
                Err(error) => {
                    metrics::counter!(BACKEND_ERRORS).increment(1);
                    tracing::warn!(%error, "rate-limit backend unavailable; using this process's buckets");
                }
            }
        }
        self.local.decide(policy, key)
    }

    /// Login: one attempt from the IP's bucket and one from the account name's, whether or not
    /// the account exists. The handler puts the [`HandlerLimits`] in its response, refused or
    /// not, so that the RateLimit headers show the login's policies too.
    pub async fn check_login(
        &self,
        ip: IpAddr,
        account: &str,
    ) -> (HandlerLimits, Result<(), Problem>) {
        let by_ip = self.decide(&self.login_per_ip, &ip_key(ip)).await;
        let by_account = self
            .decide(&self.login_per_account, &account.trim().to_lowercase())
            .await;
        let applied = [
            (&self.login_per_ip, by_ip),
            (&self.login_per_account, by_account),
        ];
        let limits = HandlerLimits(
            applied
                .iter()
                .map(|(policy, decision)| ((*policy).clone(), *decision))
                .collect(),
        );
        let denied = applied
            .into_iter()
            .filter(|(_, decision)| !decision.allowed)
            .max_by_key(|(_, decision)| decision.retry_after);
        let result = match denied {
            None => Ok(()),
            Some((policy, decision)) => Err(rejected(
                policy.name,
                decision.retry_after,
                "Too many login attempts; wait before trying again.",
            )),
        };
        (limits, result)
    }

    /// Forgets full local buckets, so memory does not grow with every key ever seen.
    pub fn forget_idle(&self) {
        self.local.forget_idle();
    }
}

/// The bucket key for a client address. An IPv6 client usually holds a whole /64, so keying by
/// its single address would give it 2^64 buckets.
fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, 64)
            .map_or_else(|_| v6.to_string(), |net| net.trunc().to_string()),
    }
}

/// Decisions a handler made on buckets of its own (login's), for [`enforce`] to report in the
/// `RateLimit-Policy` and `RateLimit` headers beside the ones it made.
#[derive(Debug, Clone, Default)]
pub struct HandlerLimits(Vec<(Policy, Decision)>);

/// Appends `"default";r=599;t=1` (a `RateLimit` item) to `out`.
fn write_state_item(out: &mut String, policy: &Policy, decision: &Decision) {
    let _ = write!(
        out,
        "\"{}\";r={};t={}",
        policy.name,
        decision.remaining,
        ceil_secs(decision.reset)
    );
}

fn rejected(policy: &'static str, wait: Duration, detail: &'static str) -> Problem {
    metrics::counter!(REJECTIONS, "policy" => policy).increment(1);
    Problem::new(ErrorCode::RateLimited, detail).with_header(
        header::RETRY_AFTER,
        HeaderValue::from(ceil_secs(wait).max(1)),
    )
}

/// Applies `default` (and `writes` to writes) to every `/v1` route, keyed by the principal or,
/// for anonymous calls, the client IP, and adds the RateLimit headers. Runs after
/// `auth::identify` (a principal is known) and before `auth::Require` (401s carry the headers).
pub async fn enforce(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    // By path, not matched route: unknown `/v1/...` paths are limited (and answered) too.
    let path = request.uri().path();
    let is_api = path == "/v1" || path.starts_with("/v1/");
    if !is_api {
        return next.run(request).await;
    }
    let key = match (
        request.extensions().get::<Principal>(),
        request.extensions().get::<ClientIp>(),
    ) {
        (Some(principal), _) => format!("user:{}", principal.user_id),
        (None, Some(ClientIp(ip))) => format!("ip:{}", ip_key(*ip)),
        (None, None) => "ip:unknown".to_owned(),
    };
    let is_write = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let mut applied = vec![(
        &limiter.default,
        limiter.decide(&limiter.default, &key).await,
    )];
    if is_write {
        applied.push((&limiter.writes, limiter.decide(&limiter.writes, &key).await));
    }

    let denied = applied
        .iter()
        .filter(|(_, decision)| !decision.allowed)
        .max_by_key(|(_, decision)| decision.retry_after);
    let mut response = match denied {
        Some((policy, decision)) => rejected(
            policy.name,
            decision.retry_after,
            "Too many requests; slow down and retry after `Retry-After` seconds.",
        )
        .into_response(),
        None => next.run(request).await,
    };
    let from_handler = response
        .extensions_mut()
        .remove::<HandlerLimits>()
        .unwrap_or_default();
    // Both headers are lists: this layer's policies, then the handler's.
    let (mut policies, mut states) = (String::with_capacity(128), String::with_capacity(96));
    let ours = applied.iter().map(|(policy, decision)| (*policy, decision));
    let handlers = from_handler
        .0
        .iter()
        .map(|(policy, decision)| (policy, decision));
    for (n, (policy, decision)) in ours.chain(handlers).enumerate() {
        if n > 0 {
            policies.push_str(", ");
            states.push_str(", ");
        }
        policy.write_item(&mut policies);
        write_state_item(&mut states, policy, decision);
    }
    for (name, value) in [(RATELIMIT_POLICY, policies), (RATELIMIT, states)] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_minute: u32) -> RateLimiter {
        let quota = NonZeroU32::new(per_minute).unwrap();
        RateLimiter::new(&RateLimitConfig {
            per_minute: quota,
            writes_per_minute: quota,
            login_per_ip: NonZeroU32::new(3).unwrap(),
            login_per_account: NonZeroU32::new(2).unwrap(),
            redis_url: None,
            redis_prefix: "test".into(),
            redis_timeout: Duration::from_millis(100),
            trusted_proxies: Vec::new(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_bucket_allows_its_quota_then_says_when_to_come_back() {
        let limiter = limiter(3);
        let remaining: Vec<u32> = [
            limiter.decide(&limiter.default, "k").await,
            limiter.decide(&limiter.default, "k").await,
            limiter.decide(&limiter.default, "k").await,
        ]
        .iter()
        .map(|decision| decision.remaining)
        .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let denied = limiter.decide(&limiter.default, "k").await;
        assert!(!denied.allowed);
        // One token comes back every 20 s (60 s / 3).
        assert!(
            denied.retry_after > Duration::from_secs(15)
                && denied.retry_after <= Duration::from_secs(20),
            "{denied:?}"
        );
        assert!(
            limiter.decide(&limiter.default, "other").await.allowed,
            "keys have their own buckets"
        );
    }

    #[tokio::test]
    async fn login_is_limited_per_ip_and_per_account() {
        let limiter = limiter(100);
        let ip = IpAddr::from([10, 0, 0, 1]);
        assert!(limiter.check_login(ip, "ann@example.com").await.1.is_ok());
        assert!(limiter.check_login(ip, "ANN@example.com ").await.1.is_ok());
        let limited = limiter
            .check_login(ip, "ann@example.com")
            .await
            .1
            .unwrap_err();
        assert_eq!(limited.code(), ErrorCode::RateLimited);
        assert!(
            limiter
                .check_login(IpAddr::from([10, 0, 0, 9]), "ann@example.com")
                .await
                .1
                .is_err(),
            "the account is limited from any IP"
        );
        // The first IP has spent its 3 attempts: another account from it is refused too.
        assert!(
            limiter.check_login(ip, "bob@example.com").await.1.is_err(),
            "the IP is limited for any account"
        );
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_eq!(ip_key(a), "2001:db8:1:2::/64");
        assert_eq!(ip_key(IpAddr::from([192, 0, 2, 1])), "192.0.2.1");
    }

    #[test]
    fn policies_and_states_render_as_the_draft_asks() {
        let policy = Policy::per_minute("default", NonZeroU32::new(600).unwrap());
        let (mut item, mut state) = (String::new(), String::new());
        policy.write_item(&mut item);
        write_state_item(
            &mut state,
            &policy,
            &Decision {
                allowed: true,
                remaining: 599,
                reset: Duration::from_millis(100),
                retry_after: Duration::ZERO,
            },
        );
        assert_eq!(item, "\"default\";q=600;w=60");
        assert_eq!(state, "\"default\";r=599;t=1");
    }
}
