//! Delivery: one bounded queue and one worker task per receiver, HTTP POSTs with retries.
//!
//! The engine's notifications and retraining triggers are turned into request bodies by
//! [`crate::payload`] and queued here. What this module must never do:
//! - block or fail the caller: [`Deliverer::notify`] and [`Deliverer::retrain`] only queue;
//!   when a receiver's queue is full its *oldest* message is dropped and counted;
//! - let one slow or dead receiver delay another (each has its own queue and task), or reorder
//!   one receiver's messages (a resolution never overtakes its firing);
//! - retry what cannot succeed: network errors, timeouts, 408, 429 and 5xx are retried with
//!   jittered exponential backoff (429/503 `Retry-After` honoured up to `backoff_max_ms`);
//!   other statuses count as failed at once;
//! - log a secret: tokens never appear, URLs are logged as scheme, host, port and path only,
//!   and HTTP client errors are stripped of their URL.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{
    AlertsConfig, ConfigError, DeliveryConfig, Receiver, ReceiverKind, redact_url,
};
use crate::engine::Notification;
use crate::payload::{github_dispatch_body, retrain_webhook_body, webhook_messages};
use crate::retrain::RetrainTrigger;

/// Header carrying the retraining request's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// GitHub REST API version sent in `X-GitHub-Api-Version`.
pub const GITHUB_API_VERSION: &str = "2022-11-28";
const USER_AGENT_VALUE: &str = concat!("tinyfleet-alerts/", env!("CARGO_PKG_VERSION"));

/// Why the deliverer could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("cannot build the alerts HTTP client: {0}")]
    Client(String),
    /// [`Deliverer::spawn`] was called outside a tokio runtime.
    #[error("Deliverer::spawn must be called inside a tokio runtime")]
    NoRuntime,
}

/// Counters of one receiver. Counts are in messages (one webhook message may hold many alerts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// The receiver's name.
    pub receiver: String,
    /// `alertmanager_webhook`, `retrain_webhook` or `github_dispatch`.
    pub kind: &'static str,
    /// Waiting plus the one being sent.
    pub queued: usize,
    /// Accepted by the receiver (2xx).
    pub sent: u64,
    /// Given up: a non-retryable status, or every attempt failed.
    pub failed: u64,
    /// Retries made (attempts after the first).
    pub retried: u64,
    /// Dropped, oldest first, because the queue was full.
    pub dropped: u64,
    /// The latest failure (redacted), kept after recovery.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Job {
    body: Vec<u8>,
    idempotency_key: Option<String>,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<Job>,
    inflight: bool,
    closed: bool,
    sent: u64,
    failed: u64,
    retried: u64,
    dropped: u64,
    last_error: Option<String>,
}

struct Slot {
    receiver: Receiver,
    endpoint: String,
    /// The endpoint as it may be logged.
    log_url: String,
    state: Mutex<QueueState>,
    wake: Notify,
}

impl std::fmt::Debug for Slot {
    // The endpoint may carry credentials or a secret query: show the redacted form only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("receiver", &self.receiver)
            .field("url", &self.log_url)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // No code panics while holding the lock; a poisoned lock still holds usable counters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kind_name(&self) -> &'static str {
        match self.receiver.kind {
            ReceiverKind::AlertmanagerWebhook { .. } => "alertmanager_webhook",
            ReceiverKind::RetrainWebhook { .. } => "retrain_webhook",
            ReceiverKind::GitHubDispatch { .. } => "github_dispatch",
        }
    }
}

#[derive(Debug)]
struct Shared {
    slots: Vec<Arc<Slot>>,
    /// Some job finished (sent, failed or dropped).
    progress: Notify,
    capacity: usize,
    external_url: String,
}

/// Dropped with the last [`Deliverer`] clone: tells the workers to finish their queues.
#[derive(Debug)]
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        for slot in &self.0.slots {
            slot.lock().closed = true;
            slot.wake.notify_one();
        }
    }
}

/// Handle to the delivery workers. Cheap to clone. When the last clone is dropped each worker
/// sends what is queued (retrying as configured) and ends.
#[derive(Debug, Clone)]
pub struct Deliverer {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl Deliverer {
    /// Validates `config` and starts one worker per receiver on the current tokio runtime. The
    /// returned handle completes when every worker has ended.
    pub fn spawn(config: &AlertsConfig) -> Result<(Self, JoinHandle<()>), DeliverError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| DeliverError::NoRuntime)?;
        config.validate()?;
        let delivery = config.delivery.clone();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(delivery.request_timeout_ms))
            // A webhook that redirects is misconfigured; following it could also carry the
            // token somewhere unexpected.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DeliverError::Client(e.without_url().to_string()))?;
        let slots: Vec<Arc<Slot>> = config
            .receivers
            .iter()
            .map(|r| {
                let endpoint = r.kind.endpoint();
                Arc::new(Slot {
                    log_url: redact_url(&endpoint),
                    endpoint,
                    receiver: r.clone(),
                    state: Mutex::new(QueueState::default()),
                    wake: Notify::new(),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            slots,
            progress: Notify::new(),
            capacity: delivery.queue_capacity,
            external_url: config.external_url.clone(),
        });
        let mut workers = Vec::with_capacity(shared.slots.len());
        for slot in &shared.slots {
            tracing::info!(
                receiver = %slot.receiver.name,
                kind = slot.kind_name(),
                url = %slot.log_url,
                "alerts receiver configured"
            );
            let worker = Worker {
                slot: Arc::clone(slot),
                shared: Arc::clone(&shared),
                client: client.clone(),
                delivery: delivery.clone(),
            };
            workers.push(runtime.spawn(worker.run()));
        }
        let all = runtime.spawn(async move {
            for w in workers {
                if let Err(e) = w.await {
                    tracing::error!(error = %e, "alerts delivery worker ended abnormally");
                }
            }
        });
        let alive = Arc::new(Alive(Arc::clone(&shared)));
        Ok((
            Self {
                shared,
                _alive: alive,
            },
            all,
        ))
    }

    fn slot(&self, name: &str) -> Option<&Arc<Slot>> {
        self.shared.slots.iter().find(|s| s.receiver.name == name)
    }

    fn enqueue(&self, slot: &Slot, job: Job) {
        let mut st = slot.lock();
        let mut dropped = false;
        while st.waiting.len() >= self.shared.capacity {
            st.waiting.pop_front();
            st.dropped += 1;
            dropped = true;
        }
        st.waiting.push_back(job);
        let dropped_total = st.dropped;
        drop(st);
        if dropped {
            tracing::warn!(
                receiver = %slot.receiver.name,
                capacity = self.shared.capacity,
                dropped_total,
                "alerts delivery queue full: dropped the oldest message"
            );
            self.shared.progress.notify_waiters();
        }
        slot.wake.notify_one();
    }

    /// Queues one Alertmanager webhook message per receiver named in `notifications`. Never
    /// waits. Receivers that are unknown or do not take alerts are skipped.
    pub fn notify(&self, notifications: &[Notification]) {
        if notifications.is_empty() {
            return;
        }
        for mut msg in webhook_messages(notifications, &self.shared.external_url) {
            let Some(slot) = self.slot(&msg.receiver) else {
                tracing::warn!(receiver = %msg.receiver, "notification for an unknown receiver");
                continue;
            };
            let ReceiverKind::AlertmanagerWebhook { max_alerts, .. } = slot.receiver.kind else {
                tracing::warn!(receiver = %msg.receiver, "notification for a retraining receiver");
                continue;
            };
            msg.truncate(max_alerts);
            match serde_json::to_vec(&msg) {
                Ok(body) => self.enqueue(
                    slot,
                    Job {
                        body,
                        idempotency_key: None,
                    },
                ),
                Err(e) => tracing::error!(error = %e, "cannot encode webhook message"),
            }
        }
    }

    /// Queues the retraining request for every `retrain_webhook` and `github_dispatch`
    /// receiver. Never waits.
    pub fn retrain(&self, trigger: &RetrainTrigger) {
        for slot in &self.shared.slots {
            let body = match slot.receiver.kind {
                ReceiverKind::AlertmanagerWebhook { .. } => continue,
                ReceiverKind::RetrainWebhook { .. } => retrain_webhook_body(trigger),
                ReceiverKind::GitHubDispatch { .. } => github_dispatch_body(trigger),
            };
            match serde_json::to_vec(&body) {
                Ok(body) => self.enqueue(
                    slot,
                    Job {
                        body,
                        idempotency_key: Some(trigger.idempotency_key.clone()),
                    },
                ),
                Err(e) => tracing::error!(error = %e, "cannot encode retraining request"),
            }
        }
    }

    /// Counters of every receiver, in configuration order.
    pub fn stats(&self) -> Vec<ReceiverStats> {
        self.shared
            .slots
            .iter()
            .map(|slot| {
                let st = slot.lock();
                ReceiverStats {
                    receiver: slot.receiver.name.clone(),
                    kind: slot.kind_name(),
                    queued: st.waiting.len() + usize::from(st.inflight),
                    sent: st.sent,
                    failed: st.failed,
                    retried: st.retried,
                    dropped: st.dropped,
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }

    /// The counters in the Prometheus text format (receiver names are configuration, so the
    /// label's cardinality is bounded).
    pub fn render_prometheus(&self) -> String {
        let stats = self.stats();
        let mut out = String::new();
        let families: [MetricFamily; 5] = [
            (
                "tinyfleet_alerts_delivery_sent_total",
                "counter",
                "Messages a receiver accepted (2xx).",
                |s| s.sent,
            ),
            (
                "tinyfleet_alerts_delivery_failed_total",
                "counter",
                "Messages given up (non-retryable status or attempts exhausted).",
                |s| s.failed,
            ),
            (
                "tinyfleet_alerts_delivery_retried_total",
                "counter",
                "Delivery retries (attempts after the first).",
                |s| s.retried,
            ),
            (
                "tinyfleet_alerts_delivery_dropped_total",
                "counter",
                "Messages dropped, oldest first, because the receiver's queue was full.",
                |s| s.dropped,
            ),
            (
                "tinyfleet_alerts_delivery_queued",
                "gauge",
                "Messages waiting or being sent.",
                |s| s.queued as u64,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &stats {
                let receiver = s.receiver.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{receiver=\"{receiver}\"}} {}", get(s));
            }
        }
        out
    }

    /// Waits until every queue is empty and nothing is being sent, or `timeout` passes;
    /// returns whether everything was delivered (or given up).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let idle = || {
            self.shared.slots.iter().all(|s| {
                let st = s.lock();
                st.waiting.is_empty() && !st.inflight
            })
        };
        let wait = async {
            loop {
                let progressed = self.shared.progress.notified();
                tokio::pin!(progressed);
                progressed.as_mut().enable();
                if idle() {
                    return;
                }
                progressed.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Name, type, help and value of one metric family.
type MetricFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ReceiverStats) -> u64,
);

/// The outcome of one attempt.
enum Attempt {
    Sent,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    GiveUp(String),
}

enum Next {
    Job(Job),
    Wait,
    Stop,
}

struct Worker {
    slot: Arc<Slot>,
    shared: Arc<Shared>,
    client: reqwest::Client,
    delivery: DeliveryConfig,
}

impl Worker {
    async fn run(self) {
        loop {
            let next = {
                let mut st = self.slot.lock();
                match st.waiting.pop_front() {
                    Some(job) => {
                        st.inflight = true;
                        Next::Job(job)
                    }
                    None if st.closed => Next::Stop,
                    None => Next::Wait,
                }
            };
            match next {
                Next::Job(job) => {
                    self.deliver(job).await;
                    self.slot.lock().inflight = false;
                    self.shared.progress.notify_waiters();
                }
                Next::Stop => break,
                // `notify_one` stores a permit, so a message queued between the check and
                // this wait is not missed.
                Next::Wait => self.slot.wake.notified().await,
            }
        }
        tracing::debug!(receiver = %self.slot.receiver.name, "alerts delivery worker finished");
    }

    async fn deliver(&self, job: Job) {
        let max_attempts = self.delivery.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            match self.attempt(&job).await {
                Attempt::Sent => {
                    self.slot.lock().sent += 1;
                    tracing::debug!(receiver = %self.slot.receiver.name, url = %self.slot.log_url, attempt, "delivered");
                    return;
                }
                Attempt::GiveUp(error) => {
                    tracing::warn!(
                        receiver = %self.slot.receiver.name,
                        url = %self.slot.log_url,
                        attempt,
                        error = %error,
                        "delivery refused, not retrying"
                    );
                    let mut st = self.slot.lock();
                    st.failed += 1;
                    st.last_error = Some(error);
                    return;
                }
                Attempt::Retry { error, retry_after } => {
                    {
                        let mut st = self.slot.lock();
                        st.last_error = Some(error.clone());
                        if attempt == max_attempts {
                            st.failed += 1;
                        } else {
                            st.retried += 1;
                        }
                    }
                    if attempt == max_attempts {
                        tracing::warn!(
                            receiver = %self.slot.receiver.name,
                            url = %self.slot.log_url,
                            attempts = attempt,
                            error = %error,
                            "delivery failed, giving up"
                        );
                        return;
                    }
                    let delay = self.backoff(attempt, retry_after);
                    tracing::info!(
                        receiver = %self.slot.receiver.name,
                        url = %self.slot.log_url,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %error,
                        "delivery failed, will retry"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// `backoff_min * 2^(attempt-1)` capped at `backoff_max`, jittered into its upper half;
    /// at least the server's `Retry-After` (itself capped at `backoff_max`).
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let min = self.delivery.backoff_min_ms;
        let max = self.delivery.backoff_max_ms;
        let exp = min.saturating_mul(1u64 << (attempt - 1).min(32)).min(max);
        let jittered = rand::Rng::random_range(&mut rand::rng(), exp / 2..=exp).max(1);
        let mut delay = Duration::from_millis(jittered);
        if let Some(ra) = retry_after {
            delay = delay.max(ra.min(Duration::from_millis(max)));
        }
        delay
    }

    fn headers(&self, job: &Job) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(token) = &self.slot.receiver.bearer_token {
            // Validated printable ASCII; a value that still fails is left out, not logged.
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                v.set_sensitive(true);
                h.insert(AUTHORIZATION, v);
            }
        }
        match self.slot.receiver.kind {
            ReceiverKind::GitHubDispatch { .. } => {
                h.insert(
                    ACCEPT,
                    HeaderValue::from_static("application/vnd.github+json"),
                );
                h.insert(
                    "X-GitHub-Api-Version",
                    HeaderValue::from_static(GITHUB_API_VERSION),
                );
            }
            ReceiverKind::RetrainWebhook { .. } | ReceiverKind::AlertmanagerWebhook { .. } => {}
        }
        if let Some(key) = &job.idempotency_key
            && let Ok(v) = HeaderValue::from_str(key)
        {
            h.insert(IDEMPOTENCY_KEY_HEADER, v);
        }
        h
    }

    async fn attempt(&self, job: &Job) -> Attempt {
        let result = self
            .client
            .post(&self.slot.endpoint)
            .headers(self.headers(job))
            .body(job.body.clone())
            .send()
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    error: self.scrub(&error_chain(e)),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Sent;
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // A short excerpt of the answer helps the operator (GitHub explains refusals there).
        let excerpt = match response.text().await {
            Ok(text) => text.chars().take(200).collect::<String>(),
            Err(_) => String::new(),
        };
        let error = self.scrub(&format!("HTTP {status}: {}", excerpt.trim()));
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Attempt::Retry { error, retry_after }
        } else {
            Attempt::GiveUp(error)
        }
    }

    /// Removes the token and the full endpoint (which may carry credentials) from a message.
    fn scrub(&self, message: &str) -> String {
        let mut out = message.replace(&self.slot.endpoint, &self.slot.log_url);
        if let Some(token) = &self.slot.receiver.bearer_token
            && !token.is_empty()
        {
            out = out.replace(token.as_str(), "<redacted>");
        }
        out
    }
}

/// The error and its causes, without the request URL.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
