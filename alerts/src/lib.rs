//! Alerts: rule states, silences, inhibition, notifications and their delivery.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
