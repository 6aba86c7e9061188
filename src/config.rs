//! `tinyfleet serve` configuration: TOML, parsed then validated into a form that cannot be
//! wrong. Every field has a default, so an empty file (or none) runs a complete embedded setup.
//! Invalid configuration is an error message naming the field, never a panic.
//!
//! `default-config.toml` (printed by `tinyfleet config default`) documents every setting with
//! its default; a test keeps it equal to [`Config::default`]. `TINYFLEET__<SECTION>__<FIELD>`
//! environment variables override the file (see [`Config`]).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tinyfleet_alerts::{AlertsConfig, RuleOverride};
use tinyfleet_api::{ApiToken, Role};
use tinyfleet_broker::BrokerConfig;
use tinyfleet_drift::engine::DriftConfig;
use tinyfleet_monitor::{HealthRules, MonitorConfig, MonitorSettings};
use toml::{Table, Value};

/// The documented default configuration: every setting with its default value and meaning.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Prefix of the environment variables that override the configuration file.
pub const ENV_PREFIX: &str = "TINYFLEET__";

/// `tinyfleet config ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the documented default configuration (TOML).
    Default,
    /// Check a configuration file: parse, apply env overrides, validate; print the effective
    /// configuration's summary or the error.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// Runs a `tinyfleet config` command.
pub fn run_command(command: ConfigCommand) -> Result<(), String> {
    let text = match command {
        ConfigCommand::Default => DEFAULT_CONFIG_TOML.to_owned(),
        ConfigCommand::Check { file } => {
            let config = Config::load(Some(&file))?;
            format!("ok: {}\n", config.summary())
        }
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

/// The whole configuration file (`default-config.toml` documents every field).
///
/// After the file is read, environment variables `TINYFLEET__<SECTION>__<FIELD>` override it:
/// double underscores separate the parts of the path (`TINYFLEET__DATA_DIR`,
/// `TINYFLEET__API__LISTEN`, `TINYFLEET__INGEST__WINDOW_SECS`); an all-upper-case part matches a
/// key of the file case-insensitively, else its lower-case form (field names are lower case),
/// while a part in mixed case is used as written (alert names: `..__RULES__SensorFault__..`);
/// a number indexes an array (`TINYFLEET__API__TOKENS__0__TOKEN`, the next index appends). A
/// missing section is created. The value is read as a TOML value when it is one (numbers,
/// booleans, arrays, inline tables, quoted strings), else as a string, and a field that wants a
/// string gets the raw text even when it looks like a number. An override that names an unknown
/// field or has a bad value is an error naming the variable, never showing its value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the database, the master key and the API token live.
    pub data_dir: PathBuf,
    /// What this process runs: everything, or only ingest (a replica of a scaled-out setup).
    pub role: ServeRole,
    /// The embedded MQTT broker; on (with defaults) unless `[mqtt]` names an external broker.
    pub broker: Option<BrokerConfig>,
    /// An external broker (Mosquitto, EMQX) instead of the embedded one.
    pub mqtt: Option<MqttConfig>,
    /// The state database: SQLite in the data directory unless PostgreSQL is configured.
    pub store: StoreConfig,
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
            role: ServeRole::All,
            broker: None,
            mqtt: None,
            store: StoreConfig::default(),
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

/// The state database.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// PostgreSQL instead of the SQLite file (`postgres://user:password@host:port/db`), for
    /// several `serve` processes on one database. Never printed.
    pub postgres_url: Option<String>,
    /// A PEM file of CA certificates trusted, besides the Mozilla roots, to sign the
    /// PostgreSQL server's certificate. TLS itself is asked for by `sslmode=require` in
    /// `postgres_url` (the certificate and host name are always verified); this needs it.
    pub postgres_ca_file: Option<PathBuf>,
}

impl StoreConfig {
    /// What the store needs besides the URL.
    pub fn postgres_options(&self) -> tinyfleet_store::PostgresOptions {
        tinyfleet_store::PostgresOptions {
            ca_file: self.postgres_ca_file.clone(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let Some(url) = &self.postgres_url else {
            return match &self.postgres_ca_file {
                Some(_) => Err(
                    "config [store]: postgres_ca_file without postgres_url (it is \
                     for TLS to PostgreSQL; SQLite needs none)"
                        .into(),
                ),
                None => Ok(()),
            };
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "config [store]: postgres_url must start with postgres:// (got {})",
                tinyfleet_alerts::redact_url(url)
            ));
        }
        // The URL's settings, and the CA file: readable, certificates, with sslmode=require.
        tinyfleet_store::Store::check_postgres(url, &self.postgres_options()).map_err(|e| {
            let msg = match e {
                tinyfleet_store::StoreError::Postgres(m) => m,
                other => other.to_string(),
            };
            format!(
                "config [store]: {}",
                msg.strip_prefix("[store] ").unwrap_or(&msg)
            )
        })
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field(
                "postgres_url",
                &self
                    .postgres_url
                    .as_deref()
                    .map(tinyfleet_alerts::redact_url),
            )
            .field("postgres_ca_file", &self.postgres_ca_file)
            .finish()
    }
}

/// What one `serve` process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeRole {
    /// Broker or broker client, ingest, monitor, OTA, rollouts and the whole API.
    All,
    /// Ingest only (plus OTA block answers, `/healthz` and `/metrics` on `[api] listen`): one of
    /// several replicas splitting an external broker's `$share/...` subscription and writing a
    /// shared store (`[ingest] shared_store`). Exactly one `all` process runs beside them.
    Ingest,
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
    /// Mosquitto: keep this password file (`password_file` in mosquitto.conf) holding every
    /// active device's credentials (PBKDF2-SHA512, Mosquitto's `$7$` format) and this
    /// service's user; rewritten atomically whenever devices are provisioned or revoked.
    pub password_file: Option<PathBuf>,
    /// Run after each rewrite of `password_file` so the broker reloads it (e.g.
    /// `["systemctl", "reload", "mosquitto"]` or `["pkill", "-HUP", "-x", "mosquitto"]`).
    #[serde(default)]
    pub reload_command: Vec<String>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .field("share_group", &self.share_group)
            .field("password_file", &self.password_file)
            .field("reload_command", &self.reload_command)
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
    /// Other ingest replicas write the same store (several `serve` processes splitting one
    /// `$share/...` subscription of an external broker): each batch is applied under the
    /// store's exclusive section with state read fresh. Needs `journal = false`.
    pub shared_store: bool,
    /// Stall watchdog: a broker connection that delivers nothing, not even ingest's own probe,
    /// for this long while ingest owes it no acknowledgement is reconnected (seconds; 0 = off).
    pub stall_timeout_secs: u64,
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
            shared_store: false,
            stall_timeout_secs: 60,
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
    /// Reads `path` (or starts from the defaults when `None`), applies the `TINYFLEET__...`
    /// overrides of the process environment, then resolves and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        Self::load_with_env(path, process_overrides()?)
    }

    /// [`Config::load`] with the environment given as `(name, value)` pairs; names without the
    /// [`ENV_PREFIX`] are ignored.
    pub fn load_with_env(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let (text, origin) = match path {
            None => (None, "config (defaults)".to_owned()),
            Some(p) => (
                Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| format!("cannot read config {}: {e}", p.display()))?,
                ),
                format!("config {}", p.display()),
            ),
        };
        let overrides: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        let mut config = parse_with_overrides(text.as_deref(), &origin, &overrides)?;
        config.resolve();
        config
            .validate()
            .map_err(|e| name_overrides_in(e, &overrides))?;
        Ok(config)
    }

    /// One line saying what runs where, for `tinyfleet config check`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        match (&self.broker, &self.mqtt) {
            (Some(b), _) => parts.push(match &b.tls {
                Some(tls) => format!("embedded broker on {} (TLS on {})", b.listen, tls.listen),
                None => format!("embedded broker on {}", b.listen),
            }),
            (None, Some(m)) => parts.push(format!(
                "external broker {}:{} as client {}{}",
                m.host,
                m.port,
                m.client_id,
                m.share_group
                    .as_ref()
                    .map(|g| format!(" (share group {g})"))
                    .unwrap_or_default()
            )),
            (None, None) => parts.push("no broker".to_owned()),
        }
        parts.push(format!(
            "{}s ingest windows ({})",
            self.ingest.window_secs,
            if self.ingest.journal {
                "journal"
            } else {
                "commit per batch"
            }
        ));
        let tokens = match self.api.tokens.len() {
            0 => format!(
                "operator token generated into {}",
                self.data_dir.join("api-token").display()
            ),
            1 => "1 token".to_owned(),
            n => format!("{n} tokens"),
        };
        parts.push(format!("API on {} ({tokens})", self.api.listen));
        if let Some(influx) = &self.influx {
            parts.push(format!(
                "InfluxDB at {}",
                tinyfleet_alerts::redact_url(&influx.url)
            ));
        }
        parts.push(format!(
            "drift detector {}, {} alert receiver(s)",
            if self.monitor.drift { "on" } else { "off" },
            self.alerts.receivers.len()
        ));
        if !self.ota.public_url.is_empty() {
            parts.push(format!(
                "OTA objects at {}",
                tinyfleet_alerts::redact_url(&self.ota.public_url)
            ));
        }
        if self.role == ServeRole::Ingest {
            parts.insert(0, "ingest replica".to_owned());
        }
        if let Some(url) = &self.store.postgres_url {
            parts.push(format!(
                "PostgreSQL at {}",
                tinyfleet_alerts::redact_url(url)
            ));
        }
        if self.ingest.shared_store {
            parts.push("store shared with other ingest replicas".to_owned());
        }
        if let Some(file) = self.mqtt.as_ref().and_then(|m| m.password_file.as_ref()) {
            parts.push(format!("Mosquitto password file {}", file.display()));
        }
        parts.push(format!("data in {}", self.data_dir.display()));
        parts.join(", ")
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
        // Upper bounds keep the millisecond and second arithmetic on these (`serve`, the
        // monitor's grace) from overflowing: a wrapped retention would delete every window.
        if i.offline_after_secs == 0 || i.offline_after_secs > 31_536_000 {
            return Err("config [ingest]: offline_after_secs must be 1..=31536000 (a year)".into());
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
        if i.flush_ms == 0 || i.flush_ms > 3_600_000 {
            return Err("config [ingest]: flush_ms must be 1..=3600000".into());
        }
        if i.checkpoint_ms == 0 || i.checkpoint_ms > 3_600_000 {
            return Err("config [ingest]: checkpoint_ms must be 1..=3600000".into());
        }
        if i.stall_timeout_secs != 0 && !(4..=86_400).contains(&i.stall_timeout_secs) {
            return Err(
                "config [ingest]: stall_timeout_secs must be 0 (off) or 4..=86400 (longer than \
                 the slowest commit you expect)"
                    .into(),
            );
        }
        if i.retention_days == 0 || i.retention_days > 36_500 {
            return Err("config [ingest]: retention_days must be 1..=36500".into());
        }
        if i.shared_store {
            if i.journal {
                return Err(
                    "config [ingest]: shared_store needs journal = false (a replica's \
                     journal holds state the other replicas cannot see)"
                        .into(),
                );
            }
            if self.mqtt.as_ref().is_none_or(|m| m.share_group.is_none()) {
                return Err(
                    "config [ingest]: shared_store needs an external broker with \
                     [mqtt] share_group, so the replicas split the messages"
                        .into(),
                );
            }
        }
        if self.role == ServeRole::Ingest && !i.shared_store {
            return Err(
                "config: role = \"ingest\" needs [ingest] shared_store = true (an ingest \
                 replica writes the store the `all` process reads)"
                    .into(),
            );
        }
        self.store.validate()?;
        if let Some(m) = &self.mqtt
            && m.password_file.is_none()
            && !m.reload_command.is_empty()
        {
            return Err("config [mqtt]: reload_command without password_file".into());
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

/// The `TINYFLEET__...` variables of this process.
fn process_overrides() -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let shown = name.to_string_lossy();
        if !shown.starts_with(ENV_PREFIX) {
            continue;
        }
        let (Some(name), Ok(value)) = (name.to_str(), value.into_string()) else {
            return Err(format!(
                "environment variable {shown}: not valid UTF-8 (value not shown)"
            ));
        };
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// Deserialises a table into a [`Config`] (no resolve, no validation).
fn config_from(table: &Table) -> Result<Config, String> {
    table
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string().trim_end().to_owned())
}

/// Parses `text` (the defaults when `None`) and applies `overrides` in the order of their names.
/// An override is blamed for an error when applying it changes the outcome from success (or
/// another error) to that error; what remains is the file's own error.
fn parse_with_overrides(
    text: Option<&str>,
    origin: &str,
    overrides: &[(String, String)],
) -> Result<Config, String> {
    let mut table = match text {
        None => Table::new(),
        Some(t) => toml::from_str::<Table>(t).map_err(|e| format!("{origin}: {e}"))?,
    };
    let mut overrides: Vec<&(String, String)> = overrides
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort_by(|a, b| a.0.cmp(&b.0));
    let mut before = config_from(&table).err();
    for (name, raw) in overrides.iter().map(|o| (&o.0, &o.1)) {
        let path = env_path(name)?;
        let value = parse_env_value(raw);
        let mut trial = table.clone();
        set_path(&mut trial, &path, value.clone())
            .map_err(|e| format!("environment variable {name}: {e}"))?;
        let mut after = config_from(&trial).err();
        if after.is_some() && after != before && is_plain_scalar(&value) {
            // A field that wants a string (a password of digits) gets the raw text.
            let mut as_string = table.clone();
            set_path(&mut as_string, &path, Value::String(raw.clone()))
                .map_err(|e| format!("environment variable {name}: {e}"))?;
            let retry = config_from(&as_string).err();
            if retry.is_none() || retry == before {
                (trial, after) = (as_string, retry);
            }
        }
        if let Some(e) = &after
            && after != before
        {
            return Err(format!(
                "environment variable {name}: {}",
                redact(e, raw, &value)
            ));
        }
        (table, before) = (trial, after);
    }
    config_from(&table).map_err(|e| {
        // The file alone is wrong: its parser's message has the line and column.
        if let Some(Err(file_error)) = text.map(toml::from_str::<Config>) {
            return format!("{origin}: {file_error}");
        }
        let mut e = e;
        for (_, raw) in &overrides {
            e = redact(&e, raw, &parse_env_value(raw));
        }
        format!("{origin} (with environment overrides): {e}")
    })
}

/// A number, boolean or date: may also be meant as a string.
fn is_plain_scalar(value: &Value) -> bool {
    matches!(
        value,
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Datetime(_)
    )
}

/// The path segments of an override variable (prefix removed, as written).
fn env_path(name: &str) -> Result<Vec<String>, String> {
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    let path: Vec<String> = rest.split("__").map(str::to_owned).collect();
    if path.iter().any(String::is_empty) {
        return Err(format!(
            "environment variable {name}: empty part in the path; write \
             {ENV_PREFIX}<SECTION>__<FIELD> with double underscores only between names"
        ));
    }
    Ok(path)
}

/// The value as TOML when it is exactly one TOML value, else the text as a string.
fn parse_env_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) if t.len() == 1 => t.remove("v").unwrap_or_else(|| Value::String(raw.into())),
        _ => Value::String(raw.to_owned()),
    }
}

/// The key `segment` stands for in `table`: an existing key equal to it (or, for an upper-case
/// segment, equal ignoring case), else its lower-case form unless it is written in mixed case.
fn table_key(table: &Table, segment: &str) -> String {
    if table.contains_key(segment) {
        return segment.to_owned();
    }
    if segment.bytes().any(|b| b.is_ascii_lowercase()) {
        return segment.to_owned();
    }
    table
        .keys()
        .find(|k| k.eq_ignore_ascii_case(segment))
        .cloned()
        .unwrap_or_else(|| segment.to_ascii_lowercase())
}

/// Sets `path` in `table` to `value`, creating missing tables.
fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("empty path".into());
    };
    let key = table_key(table, first);
    if rest.is_empty() {
        table.insert(key, value);
        return Ok(());
    }
    // A missing node is created: an array when an index follows, else a table.
    let node = table.entry(key.clone()).or_insert_with(|| {
        if rest[0].parse::<usize>().is_ok() {
            Value::Array(Vec::new())
        } else {
            Value::Table(Table::new())
        }
    });
    set_in_value(node, &key, rest, value)
}

fn set_in_value(node: &mut Value, at: &str, path: &[String], value: Value) -> Result<(), String> {
    match node {
        Value::Table(t) => set_path(t, path, value),
        Value::Array(items) => {
            let Some((first, rest)) = path.split_first() else {
                return Err("empty path".into());
            };
            let index: usize = first.parse().map_err(|_| {
                format!("`{at}` is an array: the next part must be an index, not `{first}`")
            })?;
            let here = format!("{at}[{index}]");
            if index > items.len() {
                return Err(format!(
                    "`{here}`: index out of range (the array has {} entries; {} appends one)",
                    items.len(),
                    items.len()
                ));
            }
            if rest.is_empty() {
                if index == items.len() {
                    items.push(value);
                } else {
                    items[index] = value;
                }
                return Ok(());
            }
            if index == items.len() {
                items.push(Value::Table(Table::new()));
            }
            set_in_value(&mut items[index], &here, rest, value)
        }
        other => Err(format!("`{at}` is a {}, not a section", other.type_str())),
    }
}

/// `message` with every form in which a deserialiser may quote the value of `raw` (parsed as
/// `value`) replaced, so that no error shows a secret.
fn redact(message: &str, raw: &str, value: &Value) -> String {
    let mut texts = vec![raw.to_owned()];
    match value {
        Value::String(s) => texts.push(s.clone()),
        v if is_plain_scalar(v) => texts.push(v.to_string()),
        _ => {}
    }
    let mut out = message.to_owned();
    for t in texts.iter().filter(|t| !t.is_empty()) {
        for form in [format!("{t:?}"), format!("`{t}`"), format!("'{t}'")] {
            out = out.replace(&form, "<value not shown>");
        }
        if t.len() >= 4 {
            out = out.replace(t.as_str(), "<value not shown>");
        }
    }
    out
}

/// A validation error, with the override variables whose field it mentions named.
fn name_overrides_in(error: String, overrides: &[(String, String)]) -> String {
    let names: Vec<&str> = overrides
        .iter()
        .filter(|(name, _)| {
            name.rsplit("__")
                .next()
                .is_some_and(|field| error.contains(&field.to_ascii_lowercase()))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if names.is_empty() {
        error
    } else {
        format!("{error} (set by environment variable {})", names.join(", "))
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

    /// Found by review while fuzzing the configuration (`fuzz/fuzz_targets/config_toml.rs`,
    /// seeds `fuzz/seeds/config_toml/huge-*`): unbounded durations overflowed when turned into
    /// milliseconds (`tinyfleet config check` panicked on `checkpoint_ms = 9223372036854775807`
    /// in a debug build; a release build wrapped, and a wrapped retention deletes every window).
    #[test]
    fn huge_durations_are_refused() {
        for (field, value) in [
            ("checkpoint_ms", "9223372036854775807"),
            ("flush_ms", "9223372036854775807"),
            ("retention_days", "213503982334602"),
            ("offline_after_secs", "18446744073709551"),
        ] {
            let err = parse(&format!("[ingest]\n{field} = {value}")).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        let c = parse(
            "[ingest]\ncheckpoint_ms = 3600000\nflush_ms = 3600000\nretention_days = 36500\n\
             offline_after_secs = 31536000",
        )
        .unwrap();
        assert_eq!(c.monitor_config().min_grace_ms, 7_200_000);
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
    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// `text` with `vars` applied, resolved and validated (what `load_with_env` does after
    /// reading the file).
    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, String> {
        let overrides = env(vars);
        let mut c = parse_with_overrides(Some(text), "config test.toml", &overrides)?;
        c.resolve();
        c.validate().map_err(|e| name_overrides_in(e, &overrides))?;
        Ok(c)
    }

    fn resolved(mut c: Config) -> String {
        c.resolve();
        format!("{c:?}")
    }

    /// The default file with its commented-out settings (`#key = ...`, `#[section]`) enabled.
    fn uncommented_default() -> String {
        DEFAULT_CONFIG_TOML
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '[') => {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The field names serde expects at `path`, read from the unknown-field error of an injected
    /// key; `None` where the value is not a struct (a map, an enum without field list).
    fn expected_fields(full: &Table, path: &[String]) -> Option<Vec<String>> {
        const PROBE: &str = "zz_unknown_probe";
        let mut probe = full.clone();
        let mut p = path.to_vec();
        p.push(PROBE.to_owned());
        set_path(&mut probe, &p, Value::Integer(0)).unwrap();
        let err = config_from(&probe).unwrap_err();
        let marker = format!("unknown field `{PROBE}`, expected");
        let rest = &err[err.find(&marker)? + marker.len()..];
        // The list ends the line; a line `in `path`` may follow.
        let rest = rest.lines().next().unwrap_or_default();
        Some(
            rest.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect(),
        )
    }

    #[test]
    fn default_file_is_the_code_defaults() {
        let from_file: Config = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(resolved(from_file.clone()), resolved(Config::default()));
        let mut c = from_file;
        c.resolve();
        c.validate().unwrap();
        // Also through the loading path, with no file and no overrides.
        let loaded = Config::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(format!("{loaded:?}"), resolved(Config::default()));
    }

    #[test]
    fn default_file_names_every_section() {
        let sections = expected_fields(&Table::new(), &[]).unwrap();
        assert!(sections.len() >= 11, "{sections:?}");
        for name in sections {
            let found = DEFAULT_CONFIG_TOML.lines().any(|l| {
                let l = l.trim_start_matches('#');
                l.starts_with(&format!("[{name}]")) || l.starts_with(&format!("{name} ="))
            });
            assert!(
                found,
                "section or key `{name}` is not in default-config.toml"
            );
        }
    }

    #[test]
    fn default_file_documents_every_field_and_its_examples_parse() {
        let text = uncommented_default();
        let full: Table = toml::from_str(&text).unwrap();
        // The commented-out settings and examples use real field names and valid values.
        config_from(&full).unwrap();
        /// Checks the struct at `path` (`node`); the elements of an array of tables document
        /// a field together (`siblings`: all of them).
        fn walk(
            full: &Table,
            node: &Table,
            siblings: &[&Table],
            path: &mut Vec<String>,
            checked: &mut usize,
        ) {
            let fields = expected_fields(full, path);
            // The entries of a map (`alerts.rules`) document their fields together, too.
            let entries: Vec<&Table> = match fields {
                Some(_) => Vec::new(),
                None => node.values().filter_map(Value::as_table).collect(),
            };
            if let Some(fields) = fields {
                *checked += 1;
                for f in fields {
                    assert!(
                        siblings.iter().any(|t| t.contains_key(&f)),
                        "`{}.{f}` is not documented in default-config.toml",
                        path.join(".")
                    );
                }
            }
            for (k, v) in node {
                path.push(k.clone());
                match v {
                    Value::Table(t) if !entries.is_empty() => {
                        walk(full, t, &entries, path, checked)
                    }
                    Value::Table(t) => walk(full, t, &[t], path, checked),
                    Value::Array(items) => {
                        let tables: Vec<&Table> =
                            items.iter().filter_map(Value::as_table).collect();
                        for (i, item) in items.iter().enumerate() {
                            if let Value::Table(t) = item {
                                path.push(i.to_string());
                                walk(full, t, &tables, path, checked);
                                path.pop();
                            }
                        }
                    }
                    _ => {}
                }
                path.pop();
            }
        }
        let mut checked = 0;
        walk(&full, &full, &[&full], &mut Vec::new(), &mut checked);
        // root, broker, tls, mqtt, ingest, api, tokens, influx, monitor, drift, health, alerts
        // and its parts, ota: a parser change that hid the field lists would show here.
        assert!(checked >= 20, "only {checked} structs checked");
    }

    #[test]
    fn config_default_prints_the_file() {
        assert!(DEFAULT_CONFIG_TOML.contains("TINYFLEET__API__LISTEN"));
        run_command(ConfigCommand::Default).unwrap();
    }

    #[test]
    fn env_overrides_numbers_sections_and_data_dir() {
        let c = parse_env(
            "[ingest]\nwindow_secs = 300\n",
            &[
                ("TINYFLEET__INGEST__WINDOW_SECS", "60"),
                ("TINYFLEET__BROKER__LISTEN", "0.0.0.0:1884"),
                ("TINYFLEET__BROKER__MAX_PAYLOAD", "1_024"),
                ("TINYFLEET__DATA_DIR", "/var/lib/tinyfleet"),
                ("TINYFLEET__API__LISTEN", "0.0.0.0:8080"),
                ("TINYFLEET__INGEST__JOURNAL", "false"),
                ("TINYFLEET__ALERTS__DEFAULT_RECEIVERS", "[]"),
                (
                    "TINYFLEET__ALERTS__RULES__SensorFault__SEVERITY",
                    "critical",
                ),
                ("OTHER__INGEST__WINDOW_SECS", "7"),
                ("TINYFLEET_LOG", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(c.ingest.window_secs, 60);
        assert!(!c.ingest.journal);
        let broker = c.broker.as_ref().unwrap();
        assert_eq!(broker.listen, "0.0.0.0:1884".parse().unwrap());
        assert_eq!(broker.max_payload, 1024);
        assert_eq!(broker.segment_count, BrokerConfig::default().segment_count);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/tinyfleet"));
        assert_eq!(c.api.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.alerts.rule_for("SensorFault").severity, "critical");
        assert_eq!(c.alerts.rule_for("DeviceOffline").for_ms, 300_000);
    }

    #[test]
    fn env_overrides_match_file_keys_and_index_arrays() {
        let file = "[alerts.rules.DeviceOffline]\nfor_ms = 1000\n\
                    [[api.tokens]]\nname = \"ci\"\nrole = \"operator\"\n\
                    [mqtt]\nhost = \"broker.example\"\n";
        let c = parse_env(
            file,
            &[
                ("TINYFLEET__ALERTS__RULES__DEVICEOFFLINE__FOR_MS", "60000"),
                // Digits only, but the field wants a string: the raw text.
                ("TINYFLEET__API__TOKENS__0__TOKEN", "1234567890123456"),
                (
                    "TINYFLEET__API__TOKENS__1",
                    r#"{ name = "ro", sha256 = "00", role = "read" }"#,
                ),
                ("TINYFLEET__API__TOKENS__1__SHA256", &"ab".repeat(32)),
                ("TINYFLEET__MQTT__PASSWORD", "007"),
                ("TINYFLEET__MQTT__SHARE_GROUP", "\"2024\""),
            ],
        )
        .unwrap();
        assert_eq!(c.alerts.rule_for("DeviceOffline").for_ms, 60_000);
        assert_eq!(c.api.tokens[0].token.as_deref(), Some("1234567890123456"));
        assert_eq!(c.api.tokens[1].name, "ro");
        assert_eq!(
            c.api.tokens[1].to_api_token().unwrap().sha256,
            "ab".repeat(32)
        );
        let mqtt = c.mqtt.as_ref().unwrap();
        assert_eq!(mqtt.password.as_deref(), Some("007"));
        assert_eq!(mqtt.share_group.as_deref(), Some("2024"));
        assert!(c.broker.is_none());
        // An external broker given only by the environment, but not next to a [broker].
        let c = Config::load_with_env(None, env(&[("TINYFLEET__MQTT__HOST", "10.0.0.2")]));
        assert_eq!(c.unwrap().mqtt.unwrap().host, "10.0.0.2");
        let err = parse_env(
            DEFAULT_CONFIG_TOML,
            &[("TINYFLEET__MQTT__HOST", "10.0.0.2")],
        );
        assert!(err.unwrap_err().contains("exclusive"));
    }

    #[test]
    fn env_override_errors_name_the_variable() {
        let err = parse_env("", &[("TINYFLEET__INGEST__WINDOW", "60")]).unwrap_err();
        assert!(err.contains("TINYFLEET__INGEST__WINDOW:"), "{err}");
        assert!(err.contains("unknown field `window`"), "{err}");
        let err = parse_env("", &[("TINYFLEET__NOPE__X", "1")]).unwrap_err();
        assert!(
            err.contains("TINYFLEET__NOPE__X") && err.contains("nope"),
            "{err}"
        );
        let err = parse_env("", &[("TINYFLEET__API__LISTEN", "not-an-address")]).unwrap_err();
        assert!(err.contains("TINYFLEET__API__LISTEN:"), "{err}");
        let err = parse_env("", &[("TINYFLEET__INGEST__WINDOW_SECS", "ten")]).unwrap_err();
        assert!(err.contains("TINYFLEET__INGEST__WINDOW_SECS:"), "{err}");
        // Out of range: the validation error, with the variable named.
        let err = parse_env("", &[("TINYFLEET__INGEST__WINDOW_SECS", "0")]).unwrap_err();
        assert!(err.contains("window_secs must be"), "{err}");
        assert!(err.contains("TINYFLEET__INGEST__WINDOW_SECS"), "{err}");
        let err = parse_env("data_dir = \"d\"", &[("TINYFLEET__DATA_DIR__X", "1")]).unwrap_err();
        assert!(
            err.contains("TINYFLEET__DATA_DIR__X: `data_dir` is a string, not a section"),
            "{err}"
        );
        let err = parse_env("", &[("TINYFLEET__DATA_DIR__X", "1")]).unwrap_err();
        assert!(
            err.contains("TINYFLEET__DATA_DIR__X: invalid type"),
            "{err}"
        );
        let err = parse_env("", &[("TINYFLEET__API____LISTEN", "1")]).unwrap_err();
        assert!(err.contains("empty part"), "{err}");
        let err = parse_env("", &[("TINYFLEET__API__TOKENS__3__NAME", "x")]).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        // The file's own error keeps its line and column.
        let err = parse_env("[ingest]\nwindow_secs = \"x\"\n", &[]).unwrap_err();
        assert!(
            err.contains("config test.toml") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn env_override_errors_never_show_the_value() {
        for (name, secret) in [
            ("TINYFLEET__INGEST__JOURNAL", "s3cret-passw0rd"),
            ("TINYFLEET__INGEST__JOURNAL", "\"s3cret-passw0rd\""),
            ("TINYFLEET__API__TOKENS__0__ROLE", "s3cret-passw0rd"),
            ("TINYFLEET__INGEST__WINDOW_SECS", "98765432123"),
            ("TINYFLEET__MQTT__PASSWORD", "[\"s3cret-passw0rd\"]"),
        ] {
            let file =
                "[[api.tokens]]\nname = \"a\"\nrole = \"read\"\ntoken = \"0123456789abcdef\"\n";
            let err = parse_env(file, &[(name, secret)]).unwrap_err();
            assert!(err.contains(name), "{err}");
            assert!(!err.contains("s3cret") && !err.contains("98765"), "{err}");
        }
    }

    #[test]
    fn load_reads_the_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, DEFAULT_CONFIG_TOML).unwrap();
        let c = Config::load_with_env(Some(&path), env(&[("TINYFLEET__MONITOR__GRACE_SECS", "5")]))
            .unwrap();
        assert_eq!(c.monitor.grace_secs, 5);
        assert!(
            c.summary().starts_with("embedded broker on 127.0.0.1:1883"),
            "{}",
            c.summary()
        );
        assert!(
            c.summary().contains("API on 127.0.0.1:8080"),
            "{}",
            c.summary()
        );
        let err =
            Config::load_with_env(Some(&dir.path().join("missing.toml")), Vec::new()).unwrap_err();
        assert!(err.contains("cannot read config"), "{err}");
        assert!(run_command(ConfigCommand::Check { file: path }).is_ok());
    }

    #[test]
    fn a_bad_postgres_ca_file_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let tls_url = "postgres://tf:Sup3rS3cret@db.example.com/tinyfleet?sslmode=require";
        let store = |url: &str, ca: &Path| {
            format!(
                "[store]\npostgres_url = \"{url}\"\npostgres_ca_file = \"{}\"\n",
                ca.display()
            )
        };
        let missing = dir.path().join("missing-ca.pem");
        let err = parse_env(&store(tls_url, &missing), &[]).unwrap_err();
        assert!(
            err.starts_with("config [store]: postgres_ca_file")
                && err.contains("missing-ca.pem")
                && err.contains("cannot read it"),
            "{err}"
        );
        assert!(!err.contains("Sup3rS3cret"), "{err}");
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let err = parse_env(&store(tls_url, &not_pem), &[]).unwrap_err();
        assert!(err.contains("no certificate in it"), "{err}");
        // A CA file without sslmode=require would be ignored; without a URL, pointless.
        std::fs::write(&not_pem, include_str!("../store/testdata/other-ca.pem")).unwrap();
        let plain = "postgres://tf:Sup3rS3cret@db.example.com/tinyfleet";
        let err = parse_env(&store(plain, &not_pem), &[]).unwrap_err();
        assert!(err.contains("sslmode=require"), "{err}");
        assert!(!err.contains("Sup3rS3cret"), "{err}");
        let err = parse_env(
            &format!("[store]\npostgres_ca_file = \"{}\"\n", not_pem.display()),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("without postgres_url"), "{err}");
        // A readable CA certificate with sslmode=require is fine, as is a plain URL alone.
        let c = parse_env(&store(tls_url, &not_pem), &[]).unwrap();
        assert_eq!(c.store.postgres_ca_file.as_deref(), Some(not_pem.as_path()));
        assert!(!format!("{c:?}").contains("Sup3rS3cret"));
        parse_env(&format!("[store]\npostgres_url = \"{plain}\"\n"), &[]).unwrap();
    }
}
