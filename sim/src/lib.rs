//! The fleet simulator: simulated devices that run the real device client over real MQTT.
//!
//! Each [`device::run`] is one device's life as a tokio task: it connects to any broker with
//! its own credentials, says hello, sends a summary every interval (the `no_std` monitor's
//! encoder and authenticator, fed with generated inferences), and installs what it is offered
//! with the real OTA installer on a simulated NOR flash: verify the signed offer against its
//! trusted keys, fetch the object by MQTT block requests, apply it into the inactive slot,
//! switch, reboot into the trial, run the self-test and confirm or revert, reporting every
//! step on its progress topic. After a reboot it says hello with the model version it now
//! runs, so the backend sees the version change the way it would on a real fleet.
//!
//! What a device's data looks like is the scenario's ([`Behaviour`]): a function from the
//! device, its model version and the window number to the stream's parameters (covariate
//! shift, accuracy), the share of labelled inferences, and whether a version's self-test
//! passes. Tests and the demo watch devices through [`SimEvent`]s.
//!
//! As a load generator ([`run_with`] and [`load`]): a device's flash is copy-on-write (shared
//! with every device of the same factory image until its first install), its MQTT client keeps
//! few publishes in flight, and connections, summaries, PUBACK latencies and the publish times
//! of sampled summaries are counted into a shared [`load::LoadStats`].

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod device;
pub mod load;

pub use device::{
    Behaviour, DeviceSpec, Factory, SimEvent, SimEventKind, StreamContext, WindowData, draw,
    reference_csv, run, run_with,
};
