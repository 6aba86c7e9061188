//! Alerts: rule states, silences, inhibition, notifications and their delivery.
//!
//! The service feeds detector results into the synchronous [`AlertManager`] and hands what
//! comes out to the asynchronous [`Deliverer`] (and to MQTT via [`payload::mqtt_alert_event`]):
//!
//! ```no_run
//! # async fn demo(now_ms: i64) -> Result<(), Box<dyn std::error::Error>> {
//! use tinyfleet_alerts::{AlertManager, AlertsConfig, Condition, Deliverer};
//!
//! let config = AlertsConfig::default();
//! let mut manager = AlertManager::new(config.clone())?;
//! let (deliverer, _workers) = Deliverer::spawn(&config)?;
//! let conditions = vec![Condition::new("DeviceOffline", 12.0).label("device", "d1")];
//! let notifications = manager.evaluate(now_ms, "presence", conditions);
//! deliverer.notify(&notifications);
//! for n in &notifications {
//!     let _event: Vec<u8> = tinyfleet_alerts::payload::mqtt_alert_event(n)?;
//! }
//! let _persist = serde_json::to_vec(&manager.snapshot())?;
//! # Ok(()) }
//! ```
//!
//! Modules: [`engine`] (state machine, silences, inhibition, snapshot), [`config`] (TOML
//! configuration and validation), [`matcher`] (label matchers, fingerprints), [`retrain`]
//! (retraining requests and their cool-down), [`payload`] (wire shapes), [`deliver`] (queues,
//! HTTP, retries, counters).
//!
//! What this crate must never do: notify one transition twice, block its caller on a
//! receiver, panic on input or configuration, or log a token or URL credentials.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod deliver;
pub mod engine;
mod float;
pub mod matcher;
pub mod payload;
pub mod retrain;

pub use config::{
    AlertRule, AlertsConfig, ConfigError, DeliveryConfig, InhibitRule, Receiver, ReceiverKind,
    RuleOverride, TriggerPolicy, redact_url,
};
pub use deliver::{DeliverError, Deliverer, ReceiverStats};
pub use engine::{
    AlertManager, AlertState, AlertStatus, AlertView, Condition, EngineStats, Notification,
    NotificationKind, RestoreError, Silence, SilenceError, SilenceState, SilenceView, Snapshot,
};
pub use matcher::{Labels, MatchOp, Matcher, MatcherError, fingerprint};
pub use retrain::{RetrainDecision, RetrainRequest, RetrainTrigger};
