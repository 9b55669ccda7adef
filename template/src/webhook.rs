//! Import notifications to a partner's webhook, through an adapter.
//!
//! Prevents: a slow or dead partner slowing the service (the call runs in a job with a timeout,
//! never in a request); hammering a partner that is down (a circuit breaker refuses calls for a
//! cooldown after several failures in a row, then lets one trial through); lost notifications
//! (the job is enqueued with the import's final state and retried with backoff); and server-side
//! request forgery (the target must be http(s) and resolve only to public addresses, redirects are
//! not followed). The rest of the service sees [`Notification`]; only this module knows the
//! partner's wire format.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use chrono::{DateTime, Utc};
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::circuit_breaker::CircuitBreaker;
use crate::config::Config;
use crate::imports::domain::ImportStatus;
use crate::imports::store::Import;
use crate::jobs::{self, JobError};

pub const QUEUE: &str = "webhooks";
pub const DELIVERIES: &str = "webhook_deliveries_total";
pub const CIRCUIT_OPEN: &str = "webhook_circuit_open";

/// What the service tells the outside world when an import finishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notification {
    pub import_id: Uuid,
    pub owner_id: Uuid,
    pub status: ImportStatus,
    pub total_rows: i32,
    pub imported_orders: i32,
    pub rejected_orders: i32,
    pub failed_rows: i32,
    pub finished_at: Option<DateTime<Utc>>,
    pub request_id: Option<String>,
}

impl From<&Import> for Notification {
    fn from(import: &Import) -> Self {
        Notification {
            import_id: import.id,
            owner_id: import.owner_id,
            status: import.status,
            total_rows: import.total_rows,
            imported_orders: import.imported_orders,
            rejected_orders: import.rejected_orders,
            failed_rows: import.failed_rows,
            finished_at: import.finished_at,
            request_id: import.request_id.clone(),
        }
    }
}

/// The partner's wire format. Change it here and nowhere else.
#[derive(Debug, Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    type_: &'static str,
    /// Stable per import: receivers drop duplicates by it (deliveries are at least once).
    id: String,
    data: &'a Notification,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the circuit is open: the receiver failed {failures} times in a row")]
    CircuitOpen {
        failures: u32,
        /// When the circuit lets a trial call through.
        retry_in: Duration,
    },
    #[error("the target is not allowed: {0}")]
    Forbidden(String),
    /// Retried (a DNS answer can change) but not counted against the partner by the breaker.
    #[error("{0} resolves to no public address")]
    NoPublicAddress(String),
    #[error("the receiver answered {0}")]
    Status(reqwest::StatusCode),
    #[error("the call failed: {0}")]
    Transport(#[from] reqwest::Error),
}

/// The adapter: one partner URL, a client with a timeout and an address filter, and a breaker.
#[derive(Debug)]
pub struct Webhook {
    url: Url,
    client: reqwest::Client,
    allow_private: bool,
    breaker: CircuitBreaker,
}

impl Webhook {
    pub fn new(
        url: Url,
        timeout: Duration,
        allow_private: bool,
        breaker: CircuitBreaker,
    ) -> anyhow::Result<Self> {
        let mut client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect could lead anywhere, the internal network included: a 3xx is a failure.
            .redirect(reqwest::redirect::Policy::none())
            // Through a proxy, the proxy resolves the target and the filter below would only see
            // the proxy: webhooks go direct, whatever HTTP(S)_PROXY says.
            .no_proxy();
        if !allow_private {
            client = client.dns_resolver(Arc::new(PublicAddressesOnly));
        }
        Ok(Webhook {
            url,
            client: client.build()?,
            allow_private,
            breaker,
        })
    }

    pub async fn send(&self, notification: &Notification) -> Result<(), DeliveryError> {
        // An address written in the URL is not resolved, so the filter must see it here.
        // (The configuration refuses such a URL at startup; this is the last line of defence.)
        if !self.allow_private
            && let Some(ip) = literal_ip(&self.url)
            && !is_public(ip)
        {
            metrics::counter!(DELIVERIES, "outcome" => "forbidden").increment(1);
            return Err(DeliveryError::Forbidden(format!(
                "{ip} is not a public address"
            )));
        }
        let permit = match self.breaker.allow() {
            Ok(permit) => permit,
            Err(open) => {
                metrics::counter!(DELIVERIES, "outcome" => "short_circuited").increment(1);
                return Err(DeliveryError::CircuitOpen {
                    failures: open.failures,
                    retry_in: open.retry_in,
                });
            }
        };
        let event = WireEvent {
            type_: "import.finished",
            id: format!("import-{}", notification.import_id),
            data: notification,
        };
        // The trace continues at the receiver (W3C traceparent), and the request that started
        // the import can be quoted to the partner.
        let mut headers = reqwest::header::HeaderMap::new();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let context = tracing::Span::current().context();
            propagator.inject_context(
                &context,
                &mut opentelemetry_http::HeaderInjector(&mut headers),
            );
        });
        if let Some(request_id) = &notification.request_id
            && let Ok(value) = request_id.parse()
        {
            headers.insert(crate::request_id::REQUEST_ID_HEADER, value);
        }
        let request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .json(&event);
        let result = match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(DeliveryError::Status(response.status())),
            // A name that resolves only to private addresses says nothing about the partner's
            // health: the breaker does not count it, and a trial it used up is given back.
            Err(error) => match refusal(&error) {
                Some(host) => {
                    metrics::counter!(DELIVERIES, "outcome" => "forbidden").increment(1);
                    self.breaker.release(permit);
                    return Err(DeliveryError::NoPublicAddress(host));
                }
                None => Err(DeliveryError::Transport(error.without_url())),
            },
        };
        let outcome = if result.is_ok() {
            "delivered"
        } else {
            "failed"
        };
        metrics::counter!(DELIVERIES, "outcome" => outcome).increment(1);
        self.breaker.record(result.is_ok());
        result
    }
}

pub(crate) fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether `ip` is on the public internet: not loopback, private, link-local, shared (CGNAT),
/// unspecified, multicast or documentation space, including IPv4 addresses inside IPv6.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240 // reserved
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 192 && b == 0 && c == 0)) // IETF protocol assignments
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match segments {
        // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d): judged by the IPv4 address.
        [0, 0, 0, 0, 0, 0, high, low] if high != 0 => is_public_v4(embedded(high, low)),
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => is_public_v4(embedded(high, low)),
        // 6to4 (2002:a.b.c.d::/48): the IPv4 address is in the prefix.
        [0x2002, high, low, ..] => is_public_v4(embedded(high, low)),
        // Teredo tunnels and documentation space.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] => false,
        [first, ..] => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80) // link-local
        }
    }
}

/// The address filter's refusal of a name (the name).
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to no public address")]
struct NoPublicAddress(String);

/// The refused name, if the filter is what failed the call. The refusal arrives wrapped by the
/// client's layers; an `io::Error` among them hides its inner error from `source()`, so that is
/// looked into too.
fn refusal(error: &reqwest::Error) -> Option<String> {
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .map_or(error, |inner| inner as &(dyn std::error::Error + 'static));
        if let Some(NoPublicAddress(host)) = inner.downcast_ref::<NoPublicAddress>() {
            return Some(host.clone());
        }
        source = error.source();
    }
    None
}

/// Resolves names as usual, then keeps only public addresses; a name with none fails.
#[derive(Debug)]
struct PublicAddressesOnly;

impl Resolve for PublicAddressesOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| is_public(address.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(NoPublicAddress(host).into());
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// Starts the notification worker; it runs until `stop` is cancelled. Without
/// `IMPORT_WEBHOOK_URL` nothing is ever enqueued for it, and it is not started.
pub fn spawn_worker(
    db: PgPool,
    config: &Config,
    stop: CancellationToken,
) -> anyhow::Result<Option<jobs::Running>> {
    let Some(url) = config.imports.webhook_url.clone() else {
        return Ok(None);
    };
    let context = Arc::new(Delivery {
        webhook: Webhook::new(
            url,
            config.log.outbound_timeout,
            config.imports.webhook_allow_private,
            CircuitBreaker::new(
                CIRCUIT_OPEN,
                config.imports.breaker_failures,
                config.imports.breaker_cooldown,
            ),
        )?,
        db: db.clone(),
        max_attempts: config.jobs.max_attempts,
    });
    let worker = WorkerBuilder::new(jobs::worker_name(QUEUE))
        .backend(jobs::storage::<Notification>(&db, QUEUE, &config.jobs).with_pubsub())
        .data(context)
        .concurrency(config.jobs.concurrency)
        .retry(jobs::retry_policy(&config.jobs)?)
        .catch_panic()
        .parallelize(tokio::spawn)
        .build(deliver);
    Ok(Some(tokio::spawn(worker.run_until(jobs::until(stop)))))
}

/// What the notification worker's jobs share.
#[derive(Debug)]
struct Delivery {
    webhook: Webhook,
    db: PgPool,
    max_attempts: usize,
}

async fn deliver(
    notification: Notification,
    delivery: Data<Arc<Delivery>>,
    attempt: Attempt,
) -> Result<(), JobError> {
    let result = jobs::instrumented(QUEUE, attempt.current(), async {
        match delivery.webhook.send(&notification).await {
            Ok(()) => Ok(()),
            // Waiting for the circuit uses up no attempt: the notification is handed on, to run
            // when a trial call is allowed. (An outage longer than the retries would otherwise
            // lose every notification of its time.)
            Err(DeliveryError::CircuitOpen { retry_in, .. }) => {
                let mut conn = delivery.db.acquire().await?;
                jobs::enqueue_after(
                    &mut conn,
                    QUEUE,
                    &notification,
                    delivery.max_attempts,
                    retry_in,
                )
                .await?;
                Err(jobs::Released.into())
            }
            // Retrying cannot make an address in the URL public; say so loudly, once.
            Err(error @ DeliveryError::Forbidden(_)) => {
                tracing::error!(%error, import_id = %notification.import_id, "webhook not sent");
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    })
    .await;
    match result {
        Err(error) if error.is::<jobs::Released>() => Ok(()),
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_targets() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2002:a00:1::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn a_loopback_target_is_refused_before_any_call() {
        let webhook = Webhook::new(
            "http://127.0.0.1:9/hook".parse().unwrap(),
            Duration::from_secs(1),
            false,
            CircuitBreaker::new(CIRCUIT_OPEN, 5, Duration::from_secs(1)),
        )
        .unwrap();
        let notification = Notification {
            import_id: Uuid::nil(),
            owner_id: Uuid::nil(),
            status: ImportStatus::Succeeded,
            total_rows: 0,
            imported_orders: 0,
            rejected_orders: 0,
            failed_rows: 0,
            finished_at: None,
            request_id: None,
        };
        let error = webhook.send(&notification).await.unwrap_err();
        assert!(matches!(error, DeliveryError::Forbidden(_)), "{error}");
        // A name resolving to loopback is refused before any connection, over http and https,
        // and the breaker does not count it against the partner.
        for url in ["http://localhost:9/hook", "https://localhost:9/hook"] {
            let named = Webhook::new(
                url.parse().unwrap(),
                Duration::from_secs(1),
                false,
                CircuitBreaker::new(CIRCUIT_OPEN, 2, Duration::from_secs(1)),
            )
            .unwrap();
            for _ in 0..3 {
                let error = named.send(&notification).await.unwrap_err();
                assert!(
                    matches!(&error, DeliveryError::NoPublicAddress(host) if host == "localhost"),
                    "{url}: {error:?}"
                );
            }
            assert!(
                named.breaker.allow().is_ok(),
                "{url}: the circuit stayed closed"
            );
        }
    }
}
