//! CONNECT authentication for the embedded broker: devices by the registry, services (ingest,
//! and later OTA) by a password generated at each start that never leaves the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tinyfleet_broker::ConnectAuth;
use tinyfleet_store::Registry;

/// The username services connect with.
pub const SERVICE_USER: &str = "tinyfleet-service";

/// Who may connect to the embedded broker.
pub struct FleetAuth {
    pub registry: Registry,
    pub service_password: String,
    /// Devices are let in only once this is true: ingest holds its subscriptions, so the broker
    /// does not acknowledge device messages that nobody will receive. Refused devices retry.
    pub devices_allowed: Arc<AtomicBool>,
}

impl ConnectAuth for FleetAuth {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        if username == SERVICE_USER {
            let (a, b) = (password.as_bytes(), self.service_password.as_bytes());
            return client_id.starts_with("tinyfleet-")
                && a.len() == b.len()
                && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        }
        // A device connects as itself: client id = username = device id.
        self.devices_allowed.load(Ordering::SeqCst)
            && client_id == username
            && self.registry.check_password(username, password)
    }
}

impl std::fmt::Debug for FleetAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetAuth")
            .field("devices_allowed", &self.devices_allowed)
            .finish_non_exhaustive()
    }
}
