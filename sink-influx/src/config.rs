//! Configuration of the InfluxDB 2 sink and its validation.
//!
//! This module decides whether a configuration is usable before anything is built from it, so
//! that `influxdb2::Client::new` (which panics on a URL it cannot parse, and silently replaces the
//! URL's path) is only ever given a URL it will use as written. It must never print the token:
//! `Debug` redacts it and no error message includes it.

use std::fmt;

use serde::Deserialize;

/// Where and how the sink writes. Deserialises with unknown fields refused; missing fields take
/// their [`Default`] values.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxConfig {
    /// Base URL of the server, `http://` or `https://`, host required, no path (or `/`), no query,
    /// no credentials. `/api/v2/write` is appended.
    pub url: String,
    /// Organisation name (ignored by VictoriaMetrics).
    pub org: String,
    /// Bucket name (ignored by VictoriaMetrics).
    pub bucket: String,
    /// API token, sent as `Authorization: Token ...`; empty sends no header. Never logged.
    pub token: String,
    /// Points per write request; a batch is written as soon as this many are queued.
    pub batch_size: usize,
    /// A non-empty queue is written at the latest this long after its oldest point arrived.
    pub flush_interval_ms: u64,
    /// Points that may wait in the queue; past it the oldest are dropped and counted. One batch
    /// being written (at most `batch_size` points) is held in addition.
    pub queue_capacity: usize,
    /// First retry delay after a failed write; doubles per failure (with jitter).
    pub backoff_min_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// One write request is abandoned (and retried) after this long.
    pub request_timeout_ms: u64,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8086".to_owned(),
            org: "tinyfleet".to_owned(),
            bucket: "tinyfleet".to_owned(),
            token: String::new(),
            batch_size: 5000,
            flush_interval_ms: 1000,
            queue_capacity: 100_000,
            backoff_min_ms: 100,
            backoff_max_ms: 30_000,
            request_timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for InfluxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.token.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        };
        f.debug_struct("InfluxConfig")
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &format_args!("{token}"))
            .field("batch_size", &self.batch_size)
            .field("flush_interval_ms", &self.flush_interval_ms)
            .field("queue_capacity", &self.queue_capacity)
            .field("backoff_min_ms", &self.backoff_min_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

/// A configuration value that cannot be used; names the field and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("influx sink config `{field}`: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it (never contains the token).
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// Upper bound on `batch_size`: one request body stays in the tens of megabytes.
pub const MAX_BATCH_SIZE: usize = 1_000_000;

impl InfluxConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_url(&self.url)?;
        if self.org.trim().is_empty() {
            return Err(bad("org", "must not be empty"));
        }
        if self.bucket.trim().is_empty() {
            return Err(bad("bucket", "must not be empty"));
        }
        if !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            // The token must fit in an HTTP header; do not echo it.
            return Err(bad(
                "token",
                "must be printable ASCII without spaces or control characters (value not shown)",
            ));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(bad(
                "batch_size",
                format!("must be 1..={MAX_BATCH_SIZE}, got {}", self.batch_size),
            ));
        }
        if self.queue_capacity < self.batch_size {
            return Err(bad(
                "queue_capacity",
                format!(
                    "must be at least batch_size ({}), got {}",
                    self.batch_size, self.queue_capacity
                ),
            ));
        }
        if self.flush_interval_ms == 0 {
            return Err(bad("flush_interval_ms", "must be at least 1"));
        }
        if self.backoff_min_ms == 0 {
            return Err(bad("backoff_min_ms", "must be at least 1"));
        }
        if self.backoff_max_ms < self.backoff_min_ms {
            return Err(bad(
                "backoff_max_ms",
                format!(
                    "must be at least backoff_min_ms ({}), got {}",
                    self.backoff_min_ms, self.backoff_max_ms
                ),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(bad("request_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }
}

fn validate_url(raw: &str) -> Result<(), ConfigError> {
    // Same parser (and so the same verdict) as influxdb2's `Url::parse`, which panics instead.
    let url = url::Url::parse(raw).map_err(|e| bad("url", format!("`{raw}` is not a URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad(
            "url",
            format!("scheme must be http or https, got `{}`", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("url", format!("`{raw}` has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Do not echo the URL: the credentials would be in it.
        return Err(bad(
            "url",
            "must not contain credentials; put the token in `token`",
        ));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(bad(
            "url",
            format!(
                "`{raw}` has the path `{}`: the influxdb2 client replaces the path with \
                 /api/v2/write, so a base path prefix (reverse proxy) would be lost; \
                 use the server root",
                url.path()
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "url",
            format!("`{raw}` must not have a query or fragment"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> InfluxConfig {
        InfluxConfig {
            url: url.to_owned(),
            ..InfluxConfig::default()
        }
    }

    #[test]
    fn default_is_valid_and_as_documented() {
        let c = InfluxConfig::default();
        c.validate().unwrap();
        assert_eq!(c.batch_size, 5000);
        assert_eq!(c.flush_interval_ms, 1000);
        assert_eq!(c.queue_capacity, 100_000);
        assert_eq!((c.backoff_min_ms, c.backoff_max_ms), (100, 30_000));
    }

    #[test]
    fn good_urls() {
        for u in [
            "http://localhost:8086",
            "http://localhost:8086/",
            "https://influx.example.com",
            "http://[::1]:8086",
            "http://10.0.0.1",
        ] {
            with_url(u)
                .validate()
                .unwrap_or_else(|e| panic!("{u}: {e}"));
        }
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason_instead_of_a_panic() {
        for (u, needle) in [
            ("", "not a URL"),
            ("localhost:8086", "scheme"),
            ("/3242/23", "not a URL"),
            ("ftp://host", "scheme"),
            ("http://", "not a URL"),
            ("unix:/run/influx.sock", "scheme"),
            ("http://host:8086/influx", "base path prefix"),
            ("http://host/api/v2/write", "path"),
            ("http://host/?org=x", "query"),
            ("http://host/#x", "fragment"),
        ] {
            let e = with_url(u).validate().unwrap_err();
            assert_eq!(e.field, "url");
            assert!(e.to_string().contains(needle), "{u}: {e}");
        }
    }

    #[test]
    fn url_credentials_are_refused_and_not_echoed() {
        let e = with_url("http://user:s3cret@host").validate().unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn numeric_limits() {
        let base = InfluxConfig::default();
        let cases: [(&str, InfluxConfig); 7] = [
            (
                "batch_size",
                InfluxConfig {
                    batch_size: 0,
                    ..base.clone()
                },
            ),
            (
                "queue_capacity",
                InfluxConfig {
                    batch_size: 10,
                    queue_capacity: 9,
                    ..base.clone()
                },
            ),
            (
                "flush_interval_ms",
                InfluxConfig {
                    flush_interval_ms: 0,
                    ..base.clone()
                },
            ),
            (
                "backoff_min_ms",
                InfluxConfig {
                    backoff_min_ms: 0,
                    ..base.clone()
                },
            ),
            (
                "backoff_max_ms",
                InfluxConfig {
                    backoff_min_ms: 10,
                    backoff_max_ms: 9,
                    ..base.clone()
                },
            ),
            (
                "request_timeout_ms",
                InfluxConfig {
                    request_timeout_ms: 0,
                    ..base.clone()
                },
            ),
            (
                "org",
                InfluxConfig {
                    org: " ".into(),
                    ..base.clone()
                },
            ),
        ];
        for (field, c) in cases {
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn token_is_redacted_and_never_echoed() {
        let c = InfluxConfig {
            token: "s3cret-token".into(),
            ..InfluxConfig::default()
        };
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("<redacted>"));

        let bad = InfluxConfig {
            token: "s3cret\ntoken".into(),
            ..InfluxConfig::default()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "token");
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn deserialises_with_defaults_and_refuses_unknown_fields() {
        let c: InfluxConfig =
            serde_json::from_str(r#"{"url":"http://h:1","token":"t","batch_size":7}"#).unwrap();
        assert_eq!(c.url, "http://h:1");
        assert_eq!(c.batch_size, 7);
        assert_eq!(c.queue_capacity, 100_000);
        let e = serde_json::from_str::<InfluxConfig>(r#"{"urll":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
