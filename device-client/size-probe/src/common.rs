//! What both probe binaries share: the reference monitoring profile, the type-size symbols, the
//! vector table, the panic handler, and the monitoring loop (a macro, so that each binary's
//! `Reset` inlines it exactly as if written there).

/// Edges of the reference profile, copied from `testkit` (std-only): upper edges of 16
/// equal-probability bins of N(0, 1), with `lo` the 0.001 quantile.
pub const NORMAL_16: [f32; 16] = [
    -1.534, -1.150, -0.887, -0.674, -0.489, -0.319, -0.157, 0.0, 0.157, 0.319, 0.489, 0.674, 0.887,
    1.150, 1.534, 3.090,
];
pub const NORMAL_LO: f32 = -3.090;
/// Latency edges in microseconds: 0, then doubling from 1 ms to 128 ms.
pub const LATENCY_US: [f32; 8] = [
    1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0, 32_000.0, 64_000.0, 128_000.0,
];

/// Bytes given to `finish_window`; the documented sufficient size for the reference
/// configuration.
pub const OUT_LEN: usize = 512;

use tinyfleet_device::{Edges, ReferenceMonitor};

/// `size_of::<ReferenceMonitor>()`, published as the *size of this symbol* (read with
/// `nm -S`/`readelf -s`). It lives in `.probe_info`, a non-allocated section (see `link.x`),
/// so it takes neither flash nor RAM and does not distort the measurement.
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_REFERENCE_MONITOR: [u8; size_of::<ReferenceMonitor<'static>>()] =
    [0; size_of::<ReferenceMonitor<'static>>()];

/// Same trick for the alignment of `ReferenceMonitor`.
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_ALIGN_OF_REFERENCE_MONITOR: [u8; align_of::<ReferenceMonitor<'static>>()] =
    [0; align_of::<ReferenceMonitor<'static>>()];

/// Same trick for the bin edges the reference monitor borrows (8 features x 16 bins plus 8
/// latency bins): they are not part of `ReferenceMonitor` and live wherever the profile does
/// (on the entry fn's stack here).
#[used]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probe_info")]
static PROBE_SIZE_OF_PROFILE_EDGES: [u8; size_of::<([Edges<16>; 8], Edges<8>)>()] =
    [0; size_of::<([Edges<16>; 8], Edges<8>)>()];

/// The reset vector: word 1 of the vector table (word 0, the initial stack pointer, is written
/// by `link.x`).
#[used]
#[unsafe(link_section = ".vector_table.reset_vector")]
static RESET_VECTOR: extern "C" fn() -> ! = crate::Reset;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The reference profile's edges, built from opaque values (as a profile that arrives at run
/// time would be, which keeps `Edges::new`'s validation in the image). Not inlined, so that the
/// edges are built straight into the caller's frame without a temporary there.
#[inline(never)]
pub fn profile() -> ([Edges<16>; 8], Edges<8>) {
    use core::hint::black_box;
    let Ok(feature_edges) = Edges::new(black_box(NORMAL_LO), black_box(NORMAL_16)) else {
        halt()
    };
    let Ok(latency_edges) = Edges::new(black_box(0.0), black_box(LATENCY_US)) else {
        halt()
    };
    ([feature_edges; 8], latency_edges)
}

/// Stops here on a setup error (bad edges or device id); the probe is never run.
pub fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The monitoring side of a device: builds the reference monitor from opaque edges, then
/// forever records 100 inferences, labels and health and finishes the window into an
/// authenticated summary written into the first `OUT_LEN` bytes of `$out` (a byte array the
/// caller declares: the message buffer, which the whole client shares with received messages);
/// `$after_window` runs after each window with `$id`, `$key` and `$out` in scope.
#[macro_export]
macro_rules! monitor_probe {
    (|$id:ident, $key:ident, $out:ident| $after_window:block) => {{
        use core::hint::black_box;
        use tinyfleet_device::{DeviceId, DeviceKey, Inference, MonitorConfig, ReferenceMonitor};
        use $crate::common::{OUT_LEN, halt};

        // The profile arrives at run time on a real device; the edges live on this stack frame.
        let (features, latency_edges) = $crate::common::profile();
        let config = MonitorConfig {
            profile: black_box(7),
            features: &features,
            latency_us: &latency_edges,
        };
        let Ok($id) = DeviceId::new(black_box("probe-01")) else {
            halt()
        };
        let $key = DeviceKey(black_box([0x5a; 32]));

        let mut now_ms: u64 = black_box(1_000);
        let mut monitor =
            ReferenceMonitor::new(config, black_box(1), black_box(0), black_box(now_ms));

        loop {
            let inferences = black_box(100u32);
            for i in 0..inferences {
                let x = black_box([0.1f32, -0.4, 1.2, 0.0, -2.5, 0.7, 3.5, f32::NAN]);
                let predicted = black_box(i as usize % 10);
                let inference = Inference {
                    features: &x,
                    predicted,
                    confidence: black_box(0.9),
                    latency_us: black_box(9_000 + i),
                };
                black_box(monitor.record(&inference)).ok();
                if black_box(i % 7 == 0) {
                    black_box(monitor.record_label(predicted, black_box(3))).ok();
                }
            }
            monitor.set_battery_mv(black_box(3_700));
            monitor.set_rssi_dbm(black_box(-67));
            monitor.observe_free_heap(black_box(4_096));
            now_ms = now_ms.wrapping_add(black_box(60_000));
            let result = monitor.finish_window(
                now_ms,
                black_box(Some(1_764_000_000)),
                $id,
                &$key,
                &mut $out[..OUT_LEN],
            );
            if black_box(result.is_err()) {
                monitor.note_dropped();
            }
            black_box(result.ok());
            black_box(&$out);
            black_box(monitor.next_seq());
            $after_window
        }
    }};
}
