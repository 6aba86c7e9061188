//! Configuration of the alert engine and its receivers, and its validation.
//!
//! Everything here deserialises from TOML (or JSON) with unknown fields refused and missing
//! fields taking their defaults; [`AlertsConfig::validate`] then checks the whole configuration
//! and returns an operator-facing [`ConfigError`] naming the field. Nothing here panics on bad
//! input, and nothing prints a token: `Debug` of [`Receiver`] redacts the bearer token and
//! shows URLs without credentials or query.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::matcher::{Matcher, compile_all};

/// Four hours, Alertmanager's default `repeat_interval`.
pub const DEFAULT_REPEAT_INTERVAL_MS: u64 = 4 * 60 * 60 * 1000;
/// How long a resolved alert stays listed (Prometheus keeps resolved alerts 15 minutes).
pub const DEFAULT_RESOLVED_RETENTION_MS: u64 = 15 * 60 * 1000;
/// The label every condition must carry.
pub const ALERTNAME: &str = "alertname";

/// The effective rule for one alertname (after defaults are applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertRule {
    /// How long a condition must hold before its alert goes from pending to firing; 0 fires at
    /// the first evaluation that reports it.
    pub for_ms: u64,
    /// How long a condition must be absent before its alert resolves; 0 resolves at the first
    /// evaluation of its source without it. A condition coming back within this time continues
    /// the same incident (same `startsAt`), which is how flapping is absorbed.
    pub resolve_after_ms: u64,
    /// Added as the `severity` label when the condition does not carry one.
    pub severity: String,
    /// A firing alert is notified again after this long; 0 never repeats.
    pub repeat_interval_ms: u64,
    /// Receivers (names in [`AlertsConfig::receivers`]) for this alertname; `None` uses
    /// [`AlertsConfig::default_receivers`].
    pub receivers: Option<Vec<String>>,
}

impl Default for AlertRule {
    fn default() -> Self {
        Self {
            for_ms: 0,
            resolve_after_ms: 0,
            severity: "warning".to_owned(),
            repeat_interval_ms: DEFAULT_REPEAT_INTERVAL_MS,
            receivers: None,
        }
    }
}

/// A per-alertname override of [`AlertsConfig::default_rule`]: fields left out take the
/// default rule's values. In TOML: `[rules.DeviceOffline] for_ms = 300000`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleOverride {
    /// See [`AlertRule::for_ms`].
    pub for_ms: Option<u64>,
    /// See [`AlertRule::resolve_after_ms`].
    pub resolve_after_ms: Option<u64>,
    /// See [`AlertRule::severity`].
    pub severity: Option<String>,
    /// See [`AlertRule::repeat_interval_ms`].
    pub repeat_interval_ms: Option<u64>,
    /// See [`AlertRule::receivers`].
    pub receivers: Option<Vec<String>>,
}

impl RuleOverride {
    /// This override applied on top of `base`.
    pub fn apply(&self, base: &AlertRule) -> AlertRule {
        AlertRule {
            for_ms: self.for_ms.unwrap_or(base.for_ms),
            resolve_after_ms: self.resolve_after_ms.unwrap_or(base.resolve_after_ms),
            severity: self
                .severity
                .clone()
                .unwrap_or_else(|| base.severity.clone()),
            repeat_interval_ms: self.repeat_interval_ms.unwrap_or(base.repeat_interval_ms),
            receivers: self.receivers.clone().or_else(|| base.receivers.clone()),
        }
    }
}

/// Mutes alerts matching `target_matchers` while an alert matching `source_matchers` fires and
/// has the same values for the `equal` labels (absent in both counts as equal, as in
/// Alertmanager). An alert never inhibits itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InhibitRule {
    /// What the inhibiting (firing) alert matches; must not be empty.
    pub source_matchers: Vec<Matcher>,
    /// What the inhibited alert matches; must not be empty.
    pub target_matchers: Vec<Matcher>,
    /// Labels that must be equal in source and target.
    #[serde(default)]
    pub equal: Vec<String>,
}

impl InhibitRule {
    /// The built-in rules: a firing `DeviceOffline` inhibits the `drift` and `quality` alerts
    /// of the same device (an offline device's statistics are stale, not drifting).
    pub fn defaults() -> Vec<Self> {
        vec![Self {
            source_matchers: vec![Matcher::equal(ALERTNAME, "DeviceOffline")],
            target_matchers: vec![Matcher::regex("kind", "drift|quality")],
            equal: vec!["device".to_owned()],
        }]
    }
}

/// Where and how a receiver is reached.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReceiverKind {
    /// Alertmanager webhook v4 JSON (`POST url`); the receiver of alert notifications.
    AlertmanagerWebhook {
        /// Target URL, `http` or `https`. Credentials or a query in it are allowed but never
        /// logged; credentials are sent as HTTP basic auth unless `bearer_token` is set.
        url: String,
        /// At most this many alerts per message (the rest counted in `truncatedAlerts`);
        /// 0 means no limit.
        #[serde(default)]
        max_alerts: usize,
    },
    /// Generic retraining webhook: JSON body with an `Idempotency-Key` header.
    RetrainWebhook {
        /// Target URL, `http` or `https` (credentials and query as for the webhook above).
        url: String,
    },
    /// GitHub `repository_dispatch` (`POST {api_base}/repos/{owner}/{repo}/dispatches`), to start
    /// a retraining workflow. Needs `bearer_token`.
    #[serde(rename = "github_dispatch")]
    GitHubDispatch {
        /// API base URL, `https://api.github.com` by default (GitHub Enterprise:
        /// `https://host/api/v3`).
        #[serde(default = "default_github_api")]
        api_base: String,
        /// Repository owner.
        owner: String,
        /// Repository name.
        repo: String,
    },
}

fn default_github_api() -> String {
    "https://api.github.com".to_owned()
}

impl ReceiverKind {
    /// Whether this receiver takes alert notifications (as opposed to retraining requests).
    pub fn takes_alerts(&self) -> bool {
        matches!(self, Self::AlertmanagerWebhook { .. })
    }

    /// The URL requests go to (for GitHub, the dispatches endpoint).
    pub fn endpoint(&self) -> String {
        match self {
            Self::AlertmanagerWebhook { url, .. } | Self::RetrainWebhook { url } => url.clone(),
            Self::GitHubDispatch {
                api_base,
                owner,
                repo,
            } => format!(
                "{}/repos/{owner}/{repo}/dispatches",
                api_base.trim_end_matches('/')
            ),
        }
    }
}

impl fmt::Debug for ReceiverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlertmanagerWebhook { url, max_alerts } => f
                .debug_struct("AlertmanagerWebhook")
                .field("url", &format_args!("{}", redact_url(url)))
                .field("max_alerts", max_alerts)
                .finish(),
            Self::RetrainWebhook { url } => f
                .debug_struct("RetrainWebhook")
                .field("url", &format_args!("{}", redact_url(url)))
                .finish(),
            Self::GitHubDispatch {
                api_base,
                owner,
                repo,
            } => f
                .debug_struct("GitHubDispatch")
                .field("api_base", &format_args!("{}", redact_url(api_base)))
                .field("owner", owner)
                .field("repo", repo)
                .finish(),
        }
    }
}

/// A named destination for notifications or retraining requests. In TOML:
///
/// ```toml
/// [[receivers]]
/// name = "ops"
/// kind = { type = "alertmanager_webhook", url = "http://alertmanager-bridge:9095/hook" }
///
/// [[receivers]]
/// name = "retrain"
/// kind = { type = "github_dispatch", owner = "acme", repo = "models" }
/// bearer_token = "ghp_..."
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receiver {
    /// Unique name, used in rules and in metrics labels.
    pub name: String,
    /// Where and how.
    pub kind: ReceiverKind,
    /// Sent as `Authorization: Bearer ...` when set. Never logged or `Debug`-printed.
    #[serde(default)]
    pub bearer_token: Option<String>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.bearer_token {
            None => "<none>",
            Some(_) => "<redacted>",
        };
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("bearer_token", &format_args!("{token}"))
            .finish()
    }
}

/// At most one retraining request per `(model_id, model_version, cohort)` per `cooldown_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerPolicy {
    /// Minimum time between two triggers for the same cohort of the same model version; 0
    /// allows every new window (an identical request is still suppressed as a duplicate).
    pub cooldown_ms: u64,
}

impl Default for TriggerPolicy {
    fn default() -> Self {
        Self {
            cooldown_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// How the deliverer queues and retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Messages waiting per receiver; past it the oldest is dropped and counted.
    pub queue_capacity: usize,
    /// Attempts per message, the first included; after the last failure it counts as failed.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with jitter.
    pub backoff_min_ms: u64,
    /// Longest delay between attempts (also caps a server's `Retry-After`).
    pub backoff_max_ms: u64,
    /// One request is abandoned (and retried) after this long.
    pub request_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1000,
            max_attempts: 8,
            backoff_min_ms: 500,
            backoff_max_ms: 60_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// The whole alerting configuration. Deserialises with unknown fields refused; missing fields
/// take their [`Default`] values. Check it with [`AlertsConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// The rule of alertnames without an entry in `rules`.
    pub default_rule: AlertRule,
    /// Per-alertname overrides of `default_rule`.
    pub rules: BTreeMap<String, RuleOverride>,
    /// Inhibition rules; `None` uses [`InhibitRule::defaults`], `Some(vec![])` disables them.
    pub inhibit_rules: Option<Vec<InhibitRule>>,
    /// Receivers of alerts whose rule names none.
    pub default_receivers: Vec<String>,
    /// Every receiver. Retraining requests go to every `retrain_webhook` and `github_dispatch`
    /// receiver.
    pub receivers: Vec<Receiver>,
    /// Retraining trigger rate limit.
    pub retrain: TriggerPolicy,
    /// Queueing and retries.
    pub delivery: DeliveryConfig,
    /// This service's URL, sent as `externalURL` and `generatorURL` (empty: none).
    pub external_url: String,
    /// Resolved alerts stay listed this long.
    pub resolved_retention_ms: u64,
    /// Expired silences stay listed this long.
    pub silence_retention_ms: u64,
    /// At most this many alerts are tracked; conditions for new alerts beyond it are refused
    /// and counted (a runaway detector must not exhaust memory).
    pub max_alerts: usize,
    /// At most this many silences.
    pub max_silences: usize,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            default_rule: AlertRule::default(),
            rules: BTreeMap::new(),
            inhibit_rules: None,
            default_receivers: Vec::new(),
            receivers: Vec::new(),
            retrain: TriggerPolicy::default(),
            delivery: DeliveryConfig::default(),
            external_url: String::new(),
            resolved_retention_ms: DEFAULT_RESOLVED_RETENTION_MS,
            silence_retention_ms: 24 * 60 * 60 * 1000,
            max_alerts: 10_000,
            max_silences: 1_000,
        }
    }
}

/// A configuration value that cannot be used; names the field and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alerts config `{field}`: {reason}")]
pub struct ConfigError {
    /// The offending field, e.g. `receivers[2].kind.url`.
    pub field: String,
    /// What is wrong with it (never contains a token or URL credentials).
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl AlertsConfig {
    /// The effective rule for `alertname`.
    pub fn rule_for(&self, alertname: &str) -> AlertRule {
        match self.rules.get(alertname) {
            Some(o) => o.apply(&self.default_rule),
            None => self.default_rule.clone(),
        }
    }

    /// The inhibition rules in force (the defaults when none are configured).
    pub fn effective_inhibit_rules(&self) -> Vec<InhibitRule> {
        self.inhibit_rules
            .clone()
            .unwrap_or_else(InhibitRule::defaults)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let field = format!("receivers[{i}]");
            validate_receiver(&field, r)?;
            if !names.insert(r.name.as_str()) {
                return Err(bad(
                    format!("{field}.name"),
                    format!("duplicate receiver name {:?}", r.name),
                ));
            }
        }
        let check_refs = |field: &str, refs: &[String]| -> Result<(), ConfigError> {
            for name in refs {
                match self.receivers.iter().find(|r| &r.name == name) {
                    None => {
                        return Err(bad(
                            field,
                            format!("unknown receiver {name:?}; define it under [[receivers]]"),
                        ));
                    }
                    Some(r) if !r.kind.takes_alerts() => {
                        return Err(bad(
                            field,
                            format!(
                                "receiver {name:?} is a retraining receiver; alerts go to \
                                 `alertmanager_webhook` receivers"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        };
        check_refs("default_receivers", &self.default_receivers)?;
        validate_rule("default_rule", &self.default_rule)?;
        if let Some(refs) = &self.default_rule.receivers {
            check_refs("default_rule.receivers", refs)?;
        }
        for (alertname, o) in &self.rules {
            let field = format!("rules.{alertname}");
            if alertname.is_empty() {
                return Err(bad("rules", "an alertname key is empty"));
            }
            validate_rule(&field, &o.apply(&self.default_rule))?;
            if let Some(refs) = &o.receivers {
                check_refs(&format!("{field}.receivers"), refs)?;
            }
        }
        if let Some(rules) = &self.inhibit_rules {
            for (i, r) in rules.iter().enumerate() {
                validate_inhibit(&format!("inhibit_rules[{i}]"), r)?;
            }
        }
        if !self.external_url.is_empty() {
            validate_http_url("external_url", &self.external_url)?;
        }
        let d = &self.delivery;
        if d.queue_capacity == 0 {
            return Err(bad("delivery.queue_capacity", "must be at least 1"));
        }
        if d.max_attempts == 0 {
            return Err(bad(
                "delivery.max_attempts",
                "must be at least 1 (the first attempt counts)",
            ));
        }
        if d.backoff_min_ms == 0 || d.backoff_min_ms > d.backoff_max_ms {
            return Err(bad(
                "delivery.backoff_min_ms",
                format!(
                    "must be 1..=backoff_max_ms ({}), got {}",
                    d.backoff_max_ms, d.backoff_min_ms
                ),
            ));
        }
        if d.request_timeout_ms == 0 {
            return Err(bad("delivery.request_timeout_ms", "must be at least 1"));
        }
        if self.max_alerts == 0 {
            return Err(bad("max_alerts", "must be at least 1"));
        }
        if self.max_silences == 0 {
            return Err(bad("max_silences", "must be at least 1"));
        }
        Ok(())
    }
}

fn validate_rule(field: &str, rule: &AlertRule) -> Result<(), ConfigError> {
    if rule.severity.trim().is_empty() {
        return Err(bad(
            format!("{field}.severity"),
            "must not be empty (e.g. \"warning\")",
        ));
    }
    Ok(())
}

fn validate_inhibit(field: &str, rule: &InhibitRule) -> Result<(), ConfigError> {
    if rule.source_matchers.is_empty() {
        return Err(bad(
            format!("{field}.source_matchers"),
            "must not be empty (it would let every firing alert inhibit)",
        ));
    }
    if rule.target_matchers.is_empty() {
        return Err(bad(
            format!("{field}.target_matchers"),
            "must not be empty (it would inhibit every alert)",
        ));
    }
    compile_all(&rule.source_matchers)
        .map_err(|e| bad(format!("{field}.source_matchers"), e.to_string()))?;
    compile_all(&rule.target_matchers)
        .map_err(|e| bad(format!("{field}.target_matchers"), e.to_string()))?;
    if rule.equal.iter().any(String::is_empty) {
        return Err(bad(format!("{field}.equal"), "a label name is empty"));
    }
    Ok(())
}

fn validate_receiver(field: &str, r: &Receiver) -> Result<(), ConfigError> {
    if r.name.trim().is_empty() {
        return Err(bad(format!("{field}.name"), "must not be empty"));
    }
    if !r
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad(
            format!("{field}.name"),
            format!(
                "{:?}: use letters, digits, '-', '_' or '.' (it is a metrics label)",
                r.name
            ),
        ));
    }
    if let Some(token) = &r.bearer_token
        && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(bad(
            format!("{field}.bearer_token"),
            "must be non-empty printable ASCII without spaces (value not shown)",
        ));
    }
    match &r.kind {
        ReceiverKind::AlertmanagerWebhook { url, .. } | ReceiverKind::RetrainWebhook { url } => {
            validate_http_url(&format!("{field}.kind.url"), url)?;
        }
        ReceiverKind::GitHubDispatch {
            api_base,
            owner,
            repo,
        } => {
            let base = validate_http_url(&format!("{field}.kind.api_base"), api_base)?;
            if base.query().is_some() || base.username() != "" || base.password().is_some() {
                return Err(bad(
                    format!("{field}.kind.api_base"),
                    "must not carry credentials or a query; put the token in `bearer_token`",
                ));
            }
            for (what, value) in [("owner", owner), ("repo", repo)] {
                if value.is_empty()
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(bad(
                        format!("{field}.kind.{what}"),
                        format!(
                            "{value:?} is not a GitHub {what} name (letters, digits, '-', '_', '.')"
                        ),
                    ));
                }
            }
            if r.bearer_token.is_none() {
                return Err(bad(
                    format!("{field}.bearer_token"),
                    "GitHub repository_dispatch needs a token with `contents: write` on the \
                     repository",
                ));
            }
        }
    }
    Ok(())
}

/// Parses an `http`/`https` URL with a host. The error shows the URL redacted.
fn validate_http_url(field: &str, raw: &str) -> Result<url::Url, ConfigError> {
    if raw.trim().is_empty() {
        return Err(bad(field, "must not be empty"));
    }
    let url = url::Url::parse(raw).map_err(|e| {
        bad(
            field,
            format!("not a valid URL ({e}): {}", redact_url_lossy(raw)),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(
            field,
            format!("scheme must be http or https, got {:?}", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad(field, "has no host"));
    }
    Ok(url)
}

/// A URL for logs: scheme, host, port and path only; credentials, query and fragment removed.
/// An unparsable URL becomes `<invalid url>`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(port) => format!("{}://{host}:{port}{}", u.scheme(), u.path()),
                None => format!("{}://{host}{}", u.scheme(), u.path()),
            }
        }
        Err(_) => "<invalid url>".to_owned(),
    }
}

/// For error messages about an unparsable URL: everything up to an `@`, `?` or `#` removed
/// or cut, so credentials and query never show.
fn redact_url_lossy(raw: &str) -> String {
    let cut = raw.find(['?', '#']).map_or(raw, |i| &raw[..i]);
    match cut.rfind('@') {
        Some(i) => format!("<redacted>@{}", &cut[i + 1..]),
        None => cut.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(name: &str, url: &str) -> Receiver {
        Receiver {
            name: name.to_owned(),
            kind: ReceiverKind::AlertmanagerWebhook {
                url: url.to_owned(),
                max_alerts: 0,
            },
            bearer_token: None,
        }
    }

    #[test]
    fn default_config_is_valid_and_has_default_inhibition() {
        let c = AlertsConfig::default();
        c.validate().unwrap();
        let rules = c.effective_inhibit_rules();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].source_matchers,
            vec![Matcher::equal("alertname", "DeviceOffline")]
        );
        assert_eq!(rules[0].equal, vec!["device".to_owned()]);
        assert_eq!(c.rule_for("Anything").repeat_interval_ms, 4 * 3600 * 1000);
    }

    #[test]
    fn toml_shaped_config_parses_and_overrides_merge() {
        let json = serde_json::json!({
            "default_rule": { "severity": "info" },
            "rules": { "DeviceOffline": { "for_ms": 300000, "severity": "critical" } },
            "default_receivers": ["ops"],
            "receivers": [
                { "name": "ops", "kind": { "type": "alertmanager_webhook", "url": "http://h/hook" } },
                { "name": "gh", "kind": { "type": "github_dispatch", "owner": "acme", "repo": "models" },
                  "bearer_token": "ghp_x" }
            ],
            "retrain": { "cooldown_ms": 0 }
        });
        let c: AlertsConfig = serde_json::from_value(json).unwrap();
        c.validate().unwrap();
        let r = c.rule_for("DeviceOffline");
        assert_eq!(r.for_ms, 300_000);
        assert_eq!(r.severity, "critical");
        assert_eq!(r.repeat_interval_ms, DEFAULT_REPEAT_INTERVAL_MS);
        assert_eq!(c.rule_for("Other").severity, "info");
        assert_eq!(
            c.receivers[1].kind.endpoint(),
            "https://api.github.com/repos/acme/models/dispatches"
        );
    }

    #[test]
    fn documented_toml_parses() {
        let text = r#"
            default_receivers = ["ops"]
            external_url = "https://fleet.example"

            [default_rule]
            repeat_interval_ms = 3600000

            [rules.DeviceOffline]
            for_ms = 300000
            severity = "critical"

            [[inhibit_rules]]
            source_matchers = [{ name = "alertname", op = "=", value = "DeviceOffline" }]
            target_matchers = [{ name = "kind", op = "=~", value = "drift|quality" }]
            equal = ["device"]

            [[receivers]]
            name = "ops"
            kind = { type = "alertmanager_webhook", url = "http://alertmanager-bridge:9095/hook" }

            [[receivers]]
            name = "retrain"
            kind = { type = "github_dispatch", owner = "acme", repo = "models" }
            bearer_token = "ghp_x"

            [retrain]
            cooldown_ms = 86400000

            [delivery]
            max_attempts = 3
        "#;
        let c: AlertsConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.rule_for("DeviceOffline").for_ms, 300_000);
        assert_eq!(c.rule_for("DeviceOffline").repeat_interval_ms, 3_600_000);
        assert_eq!(c.effective_inhibit_rules(), InhibitRule::defaults());
        assert_eq!(c.delivery.max_attempts, 3);
        assert_eq!(
            c.delivery.queue_capacity,
            DeliveryConfig::default().queue_capacity
        );
        let err = toml::from_str::<AlertsConfig>("[delivery]\nmax_attempt = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_attempt"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_value::<AlertsConfig>(serde_json::json!({ "recievers": [] }))
            .unwrap_err();
        assert!(err.to_string().contains("recievers"), "{err}");
        let err = serde_json::from_value::<Receiver>(serde_json::json!({
            "name": "x", "kind": { "type": "retrain_webhook", "url": "http://h", "urll": "" }
        }))
        .unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bad_configs_give_clear_errors() {
        let cases: Vec<(AlertsConfig, &str, &str)> = vec![
            (
                AlertsConfig {
                    receivers: vec![webhook("a", "")],
                    ..AlertsConfig::default()
                },
                "receivers[0].kind.url",
                "must not be empty",
            ),
            (
                AlertsConfig {
                    receivers: vec![webhook("a", "ftp://h/x")],
                    ..AlertsConfig::default()
                },
                "receivers[0].kind.url",
                "scheme",
            ),
            (
                AlertsConfig {
                    receivers: vec![webhook("a", "http://h"), webhook("a", "http://h")],
                    ..AlertsConfig::default()
                },
                "receivers[1].name",
                "duplicate",
            ),
            (
                AlertsConfig {
                    default_receivers: vec!["nope".into()],
                    ..AlertsConfig::default()
                },
                "default_receivers",
                "unknown receiver",
            ),
            (
                AlertsConfig {
                    inhibit_rules: Some(vec![InhibitRule {
                        source_matchers: vec![Matcher::regex("a", "(")],
                        target_matchers: vec![Matcher::equal("b", "c")],
                        equal: vec![],
                    }]),
                    ..AlertsConfig::default()
                },
                "inhibit_rules[0].source_matchers",
                "invalid regex",
            ),
            (
                AlertsConfig {
                    inhibit_rules: Some(vec![InhibitRule {
                        source_matchers: vec![Matcher::equal("a", "b")],
                        target_matchers: vec![],
                        equal: vec![],
                    }]),
                    ..AlertsConfig::default()
                },
                "inhibit_rules[0].target_matchers",
                "must not be empty",
            ),
            (
                AlertsConfig {
                    delivery: DeliveryConfig {
                        queue_capacity: 0,
                        ..DeliveryConfig::default()
                    },
                    ..AlertsConfig::default()
                },
                "delivery.queue_capacity",
                "at least 1",
            ),
            (
                AlertsConfig {
                    receivers: vec![Receiver {
                        name: "gh".into(),
                        kind: ReceiverKind::GitHubDispatch {
                            api_base: default_github_api(),
                            owner: "acme".into(),
                            repo: "models".into(),
                        },
                        bearer_token: None,
                    }],
                    ..AlertsConfig::default()
                },
                "receivers[0].bearer_token",
                "needs a token",
            ),
        ];
        for (config, field, reason) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
        }
        // A retraining receiver cannot take alerts.
        let c = AlertsConfig {
            receivers: vec![Receiver {
                name: "r".into(),
                kind: ReceiverKind::RetrainWebhook {
                    url: "http://h".into(),
                },
                bearer_token: None,
            }],
            default_receivers: vec!["r".into()],
            ..AlertsConfig::default()
        };
        assert!(c.validate().unwrap_err().reason.contains("retraining"));
        // Zero cool-down is fine.
        let c = AlertsConfig {
            retrain: TriggerPolicy { cooldown_ms: 0 },
            ..AlertsConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let r = Receiver {
            name: "x".into(),
            kind: ReceiverKind::AlertmanagerWebhook {
                url: "https://user:hunter2@hooks.example:8443/p/a?token=s3cret#frag".into(),
                max_alerts: 0,
            },
            bearer_token: Some("tok-SECRET".into()),
        };
        let dbg = format!("{r:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("user"), "{dbg}");
        assert!(
            !dbg.contains("s3cret") && !dbg.contains("tok-SECRET"),
            "{dbg}"
        );
        assert!(dbg.contains("https://hooks.example:8443/p/a"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let c = AlertsConfig {
            receivers: vec![webhook("a", "http://u:pw@[bad?x=secret")],
            ..AlertsConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("pw") && !err.contains("secret"), "{err}");
        let c = AlertsConfig {
            receivers: vec![Receiver {
                bearer_token: Some("has space".into()),
                ..webhook("a", "http://h")
            }],
            ..AlertsConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(!err.contains("has space"), "{err}");
    }
}
