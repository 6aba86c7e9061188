//! Settings of the monitoring service beyond the detector (`[drift]`) and the alert rules
//! (`[alerts]`): when windows are evaluated and what counts as bad health.

use serde::Deserialize;

/// `[monitor]`: scheduling of evaluations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorSettings {
    /// Run the drift detector at all.
    pub drift: bool,
    /// A window is evaluated this long after it closes, so late summaries (devices that
    /// buffered while offline) still count.
    pub grace_secs: u64,
    /// How often presence is checked and alert states are advanced.
    pub tick_ms: u64,
    /// Drift evaluations are kept this long (the API's history).
    pub retention_days: u64,
    /// After downtime, at most this many missed windows are evaluated (older ones are skipped).
    pub max_catch_up_windows: u32,
    /// MQTT topic prefix of alert events (`{prefix}/{alertname}`); empty turns them off.
    pub alert_topic: String,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        Self {
            drift: true,
            grace_secs: 60,
            tick_ms: 5_000,
            retention_days: 30,
            max_catch_up_windows: 288,
            alert_topic: "tf/ops/v1/alerts".to_owned(),
        }
    }
}

/// `[health]`: per-device health conditions, checked on every closed window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthRules {
    /// `LowBattery` when the window's lowest battery reading is below this (0: off).
    pub battery_low_mv: u16,
    /// `BadResets` when a window holds at least this many watchdog, brown-out or fault
    /// resets (0: off).
    pub bad_resets: u64,
    /// `SummariesLost` when at least this many summaries of a window were lost in transit or
    /// dropped on the device (0: off).
    pub lost_summaries: u64,
}

impl Default for HealthRules {
    fn default() -> Self {
        Self {
            battery_low_mv: 3300,
            bad_resets: 1,
            lost_summaries: 3,
        }
    }
}

/// Everything the monitor needs.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The ingest window length (windows are evaluated whole).
    pub window_ms: i64,
    /// The shortest grace period that makes sense: ingest's checkpoint delay (a window is
    /// only complete in the store once ingest has written it).
    pub min_grace_ms: i64,
    pub settings: MonitorSettings,
    pub health: HealthRules,
    pub drift: tinyfleet_drift::engine::DriftConfig,
    pub alerts: tinyfleet_alerts::AlertsConfig,
}

impl MonitorConfig {
    /// Checks every part; errors name the section and field.
    pub fn validate(&self) -> Result<(), String> {
        if self.window_ms <= 0 {
            return Err("ingest.window_secs must be at least 1".into());
        }
        if self.settings.tick_ms == 0 || self.settings.tick_ms > 3_600_000 {
            return Err("monitor.tick_ms must be between 1 and 3600000".into());
        }
        if self.settings.max_catch_up_windows == 0 {
            return Err("monitor.max_catch_up_windows must be at least 1".into());
        }
        if !self.settings.alert_topic.is_empty()
            && (self.settings.alert_topic.contains(['+', '#'])
                || self.settings.alert_topic.ends_with('/')
                || self.settings.alert_topic.starts_with("tf/v1/"))
        {
            return Err(format!(
                "monitor.alert_topic {:?}: a topic prefix without wildcards or a trailing '/', \
                 outside the devices' tf/v1/ tree",
                self.settings.alert_topic
            ));
        }
        self.drift.validate()?;
        self.alerts.validate().map_err(|e| e.to_string())
    }
}
