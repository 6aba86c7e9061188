//! Faults: `kill -9` of a server with the embedded broker while devices publish.
//!
//! The embedded broker lives in the server's process and keeps messages in memory: it
//! acknowledges a device's PUBACK when it has the message, before ingest has made it durable
//! (rumqttd has no hook to delay that). A `kill -9` therefore loses what the broker held and
//! ingest had not yet journaled (a few milliseconds of traffic). Those summaries are not lost
//! silently: the next summary of the device shows the gap, counted per device as
//! `lost_summaries`. With an external broker that keeps ingest's session (Mosquitto), killing
//! the server loses nothing (`tests/mosquitto.rs`). Either way nothing is counted twice, and
//! ingest resumes by itself.
//! (A kill during a rollout: `tests/rollout.rs`; broker restarts: `tests/mosquitto.rs`; the
//! disk full and the time-series store down: `tests/faults_storage.rs`.)

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::{Server, SimDevice, publish_until_stopped, wait_for};

#[test]
fn kill_9_with_the_embedded_broker_counts_every_acknowledged_summary_once_or_as_lost() {
    for journal in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let server = Server::start_with(&data, &format!("journal = {journal}"), "");
        let devices: Vec<SimDevice> = (0..6)
            .map(|i| server.provision(&format!("k-{i}")))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<Arc<AtomicU64>> = devices.iter().map(|_| Arc::default()).collect();
        let total = || counts.iter().map(|c| c.load(Ordering::SeqCst)).sum::<u64>();
        let threads: Vec<_> = devices
            .into_iter()
            .zip(&counts)
            .map(|(d, c)| {
                let (stop, c, addr) = (stop.clone(), c.clone(), server.mqtt);
                std::thread::spawn(move || publish_until_stopped(d, addr, stop, c))
            })
            .collect();

        wait_for("summaries flowing", Duration::from_secs(30), || {
            (total() >= 150).then_some(())
        });
        let (mqtt, api) = (server.mqtt, server.api.clone());
        let at_kill = total();
        server.kill9();
        let server = Server::restart_on_same_ports(&data, mqtt, &api);
        wait_for("summaries flowing again", Duration::from_secs(60), || {
            (total() >= at_kill + 150).then_some(())
        });
        stop.store(true, Ordering::SeqCst);
        let devices: Vec<SimDevice> = threads
            .into_iter()
            .map(|t| t.join().expect("device thread"))
            .collect();

        // Each summary a device saw acknowledged is counted once, or (held only by the
        // embedded broker when the process died) shows as a gap in the device's sequence.
        let mut lost_total = 0;
        for (d, c) in devices.iter().zip(&counts) {
            let acked = c.load(Ordering::SeqCst) as i64;
            let (counted, lost) = wait_for(
                &format!("{} counted (journal = {journal})", d.id),
                Duration::from_secs(20),
                || {
                    let state = &server.get(&format!("/api/v1/devices/{}", d.id))["state"];
                    let counted = state["summaries"].as_i64()?;
                    let lost = state["lost_summaries"].as_i64()?;
                    (counted + lost >= acked).then_some((counted, lost))
                },
            );
            assert_eq!(
                counted + lost,
                acked,
                "{}: counted + lost vs acknowledged (journal = {journal})",
                d.id
            );
            lost_total += lost;
        }
        assert_eq!(
            server.counter("rejected.duplicate"),
            0,
            "one summary at a time per device: nothing was delivered twice"
        );
        eprintln!(
            "journal = {journal}: {} summaries acknowledged, {at_kill} before the kill, \
             {lost_total} lost with the embedded broker's memory",
            total()
        );
        server.stop();
    }
}
