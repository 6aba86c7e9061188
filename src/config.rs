//! `tinyfleet serve` configuration: TOML, parsed then validated into a form that cannot be
//! wrong. Every field has a default, so an empty file (or none) runs a complete embedded setup.
//! Invalid configuration is an error message naming the field, never a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tinyfleet_alerts::{AlertsConfig, RuleOverride};
use tinyfleet_api::{ApiToken, Role};
use tinyfleet_broker::BrokerConfig;
use tinyfleet_drift::engine::DriftConfig;
use tinyfleet_monitor::{HealthRules, MonitorConfig, MonitorSettings};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the database, the master key and the API token live.
    pub data_dir: PathBuf,
    /// The embedded MQTT broker; on (with defaults) unless `[mqtt]` names an external broker.
    pub broker: Option<BrokerConfig>,
    /// An external broker (Mosquitto, EMQX) instead of the embedded one.
    pub mqtt: Option<MqttConfig>,
    pub ingest: IngestConfig,
    pub api: ApiConfig,
    /// Optional InfluxDB 2 (or any server speaking its `/api/v2/write`) for dashboards.
    pub influx: Option<tinyfleet_sink_influx::InfluxConfig>,
    /// When windows are evaluated, the alert topic.
    pub monitor: MonitorSettings,
    /// The drift detector.
    pub drift: DriftConfig,
    /// Per-device health conditions.
    pub health: HealthRules,
    /// Alert rules, silences' limits, inhibition, receivers and retraining triggers.
    pub alerts: AlertsConfig,
    /// Model versions, patches and offers.
    pub ota: tinyfleet_ota_service::OtaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("tinyfleet-data"),
            broker: None,
            mqtt: None,
            ingest: IngestConfig::default(),
            api: ApiConfig::default(),
            influx: None,
            monitor: MonitorSettings::default(),
            drift: DriftConfig::default(),
            health: HealthRules::default(),
            alerts: AlertsConfig::default(),
            ota: tinyfleet_ota_service::OtaConfig::default(),
        }
    }
}

/// How ingest reaches an external broker.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Must be unique per ingest replica.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Replicas with the same group split the messages (`$share/{group}/...`).
    pub share_group: Option<String>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .field("share_group", &self.share_group)
            .finish_non_exhaustive()
    }
}

fn default_mqtt_port() -> u16 {
    1883
}

fn default_client_id() -> String {
    "tinyfleet-ingest".to_owned()
}

/// Ingest settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Aggregation window length.
    pub window_secs: u64,
    /// A device silent this long is marked offline.
    pub offline_after_secs: u64,
    /// MQTT connections ingest opens (one share group); each adds the broker's in-flight
    /// window (100 on the embedded broker) to what can await a commit.
    pub connections: usize,
    /// Most messages in one store transaction.
    pub max_batch: usize,
    /// Wake-up interval for housekeeping when no message arrives.
    pub flush_ms: u64,
    /// Windows older than this are deleted.
    pub retention_days: u64,
    /// Acknowledge after an fsync'd append to `<data_dir>/ingest.journal` and checkpoint to the
    /// database every `checkpoint_ms` (much faster under load); `false` commits every batch to
    /// the database before acknowledging it. Either way nothing acknowledged is lost.
    pub journal: bool,
    pub checkpoint_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            window_secs: 300,
            offline_after_secs: 900,
            connections: 1,
            max_batch: 2000,
            flush_ms: 100,
            retention_days: 30,
            journal: true,
            checkpoint_ms: 1000,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// API tokens. With none, an operator token is generated once into
    /// `<data_dir>/api-token` (mode 0600).
    pub tokens: Vec<TokenConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: Vec::new(),
        }
    }
}

/// One API token: give its SHA-256 (hex) rather than the token itself where you can.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub token: Option<String>,
    pub sha256: Option<String>,
    pub role: Role,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl TokenConfig {
    pub fn to_api_token(&self) -> Result<ApiToken, String> {
        match (&self.token, &self.sha256) {
            (Some(t), None) if t.len() >= 16 => Ok(ApiToken::from_plain(&self.name, t, self.role)),
            (Some(_), None) => Err(format!(
                "api.tokens[{}]: token must be at least 16 characters",
                self.name
            )),
            (None, Some(h)) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(ApiToken {
                    name: self.name.clone(),
                    sha256: h.to_ascii_lowercase(),
                    role: self.role,
                })
            }
            (None, Some(_)) => Err(format!(
                "api.tokens[{}]: sha256 must be 64 hex digits",
                self.name
            )),
            _ => Err(format!(
                "api.tokens[{}]: give exactly one of token or sha256",
                self.name
            )),
        }
    }
}

impl Config {
    /// Reads `path`, or the defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let mut config: Config = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", p.display()))?
            }
        };
        config.resolve();
        config.validate()?;
        Ok(config)
    }

    /// Fills in what follows from what was given: the embedded broker runs unless an external
    /// one is configured.
    pub fn resolve(&mut self) {
        if self.broker.is_none() && self.mqtt.is_none() {
            self.broker = Some(BrokerConfig::default());
        }
        // A device that drops off for a few minutes (a radio fade, a reboot) is not news:
        // `DeviceOffline` fires after 5 minutes unless configured otherwise.
        self.alerts
            .rules
            .entry("DeviceOffline".to_owned())
            .or_insert_with(|| RuleOverride {
                for_ms: Some(300_000),
                ..RuleOverride::default()
            });
    }

    /// The monitor's configuration (drift, health, alerts) for this ingest setup.
    pub fn monitor_config(&self) -> MonitorConfig {
        let ingest = &self.ingest;
        MonitorConfig {
            window_ms: ingest.window_secs as i64 * 1000,
            // A window is complete in the store once ingest has checkpointed (or committed) it.
            min_grace_ms: 2 * if ingest.journal {
                ingest.checkpoint_ms
            } else {
                ingest.flush_ms
            } as i64,
            settings: self.monitor.clone(),
            health: self.health.clone(),
            drift: self.drift.clone(),
            alerts: self.alerts.clone(),
        }
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.broker, &self.mqtt) {
            (Some(_), Some(_)) => {
                return Err(
                    "config: [broker] (embedded) and [mqtt] (external) are exclusive; remove one"
                        .into(),
                );
            }
            (None, None) => {
                return Err("config: [mqtt] is needed when the embedded [broker] is off".into());
            }
            (Some(b), None) => b.validate().map_err(|e| format!("config [broker]: {e}"))?,
            (None, Some(m)) => {
                if m.host.is_empty() {
                    return Err("config [mqtt]: host is empty".into());
                }
            }
        }
        let i = &self.ingest;
        if i.window_secs == 0 || i.window_secs > 86_400 {
            return Err("config [ingest]: window_secs must be 1..=86400".into());
        }
        if i.offline_after_secs == 0 {
            return Err("config [ingest]: offline_after_secs must be at least 1".into());
        }
        if i.connections == 0 || i.connections > 64 {
            return Err("config [ingest]: connections must be 1..=64".into());
        }
        if i.connections > 1 && self.broker.is_some() {
            // rumqttd 0.20 panics (and its router dies) when a persistent-session client with a
            // shared subscription disconnects (router/routing.rs: "group must exists").
            return Err(
                "config [ingest]: connections > 1 needs an external broker; the embedded broker \
                 (rumqttd 0.20) crashes on shared subscriptions with persistent sessions"
                    .into(),
            );
        }
        if i.max_batch == 0 || i.max_batch > 100_000 {
            return Err("config [ingest]: max_batch must be 1..=100000".into());
        }
        if i.flush_ms == 0 {
            return Err("config [ingest]: flush_ms must be at least 1".into());
        }
        if i.checkpoint_ms == 0 {
            return Err("config [ingest]: checkpoint_ms must be at least 1".into());
        }
        if i.retention_days == 0 {
            return Err("config [ingest]: retention_days must be at least 1".into());
        }
        for t in &self.api.tokens {
            t.to_api_token()?;
        }
        if let Some(influx) = &self.influx {
            influx
                .validate()
                .map_err(|e| format!("config [influx]: {e}"))?;
        }
        self.ota.validate().map_err(|e| format!("config: {e}"))?;
        self.monitor_config()
            .validate()
            .map_err(|e| format!("config: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let mut c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.resolve();
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn empty_config_runs_embedded() {
        let c = parse("").unwrap();
        assert!(c.broker.is_some() && c.mqtt.is_none());
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(parse("nonsense = 1").unwrap_err().contains("unknown field"));
        assert!(
            parse("[ingest]\nwindow_secs = 0")
                .unwrap_err()
                .contains("window_secs")
        );
        assert!(parse("[mqtt]\nhost = \"x\"").unwrap().broker.is_none());
        assert!(
            parse("[broker]\n[mqtt]\nhost = \"x\"")
                .unwrap_err()
                .contains("exclusive")
        );
        assert!(
            parse("[[api.tokens]]\nname = \"a\"\ntoken = \"short\"\nrole = \"read\"")
                .unwrap_err()
                .contains("16")
        );
        assert!(
            parse("[[api.tokens]]\nname = \"a\"\nrole = \"admin\"")
                .unwrap_err()
                .contains("unknown variant")
        );
        assert!(
            parse("[broker]\nmax_payload = 0")
                .unwrap_err()
                .contains("broker")
        );
        assert!(parse("[drift]\nfdr = 2.0").unwrap_err().contains("fdr"));
        assert!(
            parse("[ota]\nblock_size = 100")
                .unwrap_err()
                .contains("ota.block_size")
        );
        assert!(
            parse("[monitor]\nalert_topic = \"tf/v1/x\"")
                .unwrap_err()
                .contains("alert_topic")
        );
        let err = parse("[alerts]\ndefault_receivers = [\"nope\"]").unwrap_err();
        assert!(err.contains("default_receivers"), "{err}");
        assert!(
            parse("[health]\nbattery_low = 3")
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn monitoring_sections_parse() {
        let c = parse(
            r#"
[monitor]
grace_secs = 30
[drift]
persistence = 3
[health]
battery_low_mv = 3400
[alerts]
default_receivers = ["ops"]
[[alerts.receivers]]
name = "ops"
kind = { type = "alertmanager_webhook", url = "http://127.0.0.1:9/hook" }
[alerts.rules.FeatureDrift]
severity = "critical"
"#,
        )
        .unwrap();
        let m = c.monitor_config();
        assert_eq!(m.settings.grace_secs, 30);
        assert_eq!(m.drift.persistence, 3);
        assert_eq!(m.health.battery_low_mv, 3400);
        assert_eq!(m.alerts.rule_for("FeatureDrift").severity, "critical");
        assert_eq!(m.alerts.rule_for("DeviceOffline").for_ms, 300_000);
        assert_eq!(m.min_grace_ms, 2000);
    }
}
