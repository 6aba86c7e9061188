//! Shared by ingest's integration tests: the embedded broker authenticating against a store.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tinyfleet_broker::{BrokerConfig, EmbeddedBroker};
use tinyfleet_ingest::auth::FleetAuth;
use tinyfleet_store::Store;

/// The password of ingest's service user on the test broker.
pub const SERVICE_PASSWORD: &str = "test-service-password";

/// Starts the embedded broker on an ephemeral loopback port, devices authenticated from
/// `store`'s registry, devices allowed in at once.
pub async fn start_broker(store: &Store) -> EmbeddedBroker {
    let broker_config = BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        ..BrokerConfig::default()
    };
    let auth = Arc::new(FleetAuth {
        registry: store.registry().clone(),
        service_password: SERVICE_PASSWORD.into(),
        devices_allowed: Arc::new(AtomicBool::new(true)),
    });
    tokio::task::spawn_blocking(move || EmbeddedBroker::start(&broker_config, auth))
        .await
        .expect("broker task")
        .expect("broker starts")
}
