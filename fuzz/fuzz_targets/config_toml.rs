//! The `tinyfleet` configuration (`src/config.rs` of the root package, included as a module:
//! the root package is a binary only): a TOML file, then `TINYFLEET__<SECTION>__<FIELD>`
//! environment overrides, then validation, which covers the config types of every crate it is
//! built from (`[broker]`, `[ingest]`, `[api]` tokens, `[influx]`, `[monitor]`, `[drift]`,
//! `[health]`, `[alerts]` with receivers, `[ota]`).
//!
//! Input: the TOML text, optionally followed by a NUL byte and `NAME=VALUE` overrides separated
//! by NUL bytes (`NAME` without the `TINYFLEET__` prefix).
//!
//! Properties: never panics (on parse, override, validation, or what `serve` derives from a
//! valid configuration: the summary line, the monitor's configuration, the alert receivers'
//! endpoints, the InfluxDB client, whose builder panics on URLs the validation must refuse);
//! a valid configuration still validates after resolving again.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/config.rs"]
mod config;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn file() -> &'static std::path::Path {
    static FILE: OnceLock<std::path::PathBuf> = OnceLock::new();
    FILE.get_or_init(|| tinyfleet_fuzz::scratch_dir("config").join("fleet.toml"))
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let toml = parts.next().unwrap_or_default();
    let overrides: Vec<(String, String)> = parts
        .filter_map(|o| {
            let o = String::from_utf8_lossy(o);
            let (name, value) = o.split_once('=')?;
            Some((format!("{}{name}", config::ENV_PREFIX), value.to_owned()))
        })
        .collect();
    std::fs::write(file(), toml).expect("write the config file");
    let Ok(mut c) = config::Config::load_with_env(Some(file()), overrides) else {
        return;
    };
    let _ = c.summary();
    // Overflow checks are on in fuzz builds: the monitor's grace (2 x checkpoint_ms) and what
    // `serve` derives from the ingest settings (src/serve.rs) must not overflow.
    let _ = c.monitor_config();
    let i = &c.ingest;
    assert!(
        i64::try_from(i.offline_after_secs)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .is_some(),
        "offline_after_secs {} overflows in milliseconds",
        i.offline_after_secs
    );
    assert!(
        i.retention_days.checked_mul(86_400).is_some(),
        "retention_days {} overflows in seconds",
        i.retention_days
    );
    for r in &c.alerts.receivers {
        let _ = tinyfleet_alerts::redact_url(&r.kind.endpoint());
    }
    if let Some(influx) = &c.influx {
        // What `InfluxSink::spawn` does after `validate`: its comment says this cannot panic.
        let _ = influxdb2::ClientBuilder::new(
            influx.url.as_str(),
            influx.org.as_str(),
            influx.token.as_str(),
        )
        .build();
    }
    c.resolve();
    c.validate().expect("a valid configuration stays valid");
});
