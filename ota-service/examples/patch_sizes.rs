//! Patch sizes on realistic model changes: writes each (base, new) pair and its `TFP1` patch to
//! a directory and prints one tab-separated line per scenario (scenario, image bytes, TFP1
//! bytes, LZ4 of the whole new image). `scripts/patch-bench.sh` adds bsdiff (detools) beside it.
//!
//! The images are synthetic int8 models: a header, then per layer an int8 weight tensor
//! (normal weights quantised with a per-tensor scale) and an int32 bias, 16-byte aligned, about
//! 210 KB in all.
//!
//! Usage: `cargo run --release -p tinyfleet-ota-service --example patch_sizes -- DIR`

use std::io::Write;

use tinyfleet_ota_service::delta::{DEFAULT_BLOCK_SIZE, diff};

/// Layer sizes (weights) of the synthetic model: a small CNN for keyword spotting.
const LAYERS: [usize; 8] = [864, 4608, 9216, 18432, 36864, 73728, 55296, 2560];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

/// Float weights of every layer.
type Weights = Vec<Vec<f64>>;

fn init(rng: &mut Rng) -> Weights {
    LAYERS
        .iter()
        .enumerate()
        .map(|(l, &n)| {
            let sd = 0.5 / (1.0 + l as f64);
            (0..n).map(|_| rng.normal() * sd).collect()
        })
        .collect()
}

/// The flat image: header, then per layer the scale, int8 weights and int32 biases.
fn image(w: &Weights, extra_layer: Option<&[f64]>, at: usize) -> Vec<u8> {
    let mut out = b"TFL3tinyfleet-synthetic-model\0\0\0".to_vec();
    out.resize(64, 0);
    for (l, layer) in w.iter().enumerate() {
        if let Some(extra) = extra_layer.filter(|_| l == at) {
            // A new tensor inserted before this layer (an architecture change).
            out.extend(
                extra
                    .iter()
                    .map(|v| (v * 127.0).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        let max = layer.iter().fold(1e-9f64, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        out.extend_from_slice(&(scale as f32).to_le_bytes());
        out.extend(
            layer
                .iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
        );
        let outputs = (layer.len() / 64).max(1);
        for o in 0..outputs {
            let bias = (layer[o % layer.len()] * 1000.0 / scale) as i32;
            out.extend_from_slice(&bias.to_le_bytes());
        }
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
    }
    out
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/patch-bench".into());
    std::fs::create_dir_all(&dir).expect("create output directory");
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let base_w = init(&mut rng);
    let base = image(&base_w, None, 0);

    // Warm-start retrain: every weight moves a little (and so every scale).
    let retrain: Weights = base_w
        .iter()
        .map(|l| {
            let sd = l.iter().map(|v| v * v).sum::<f64>().sqrt() / (l.len() as f64).sqrt();
            l.iter().map(|v| v + rng.normal() * sd * 0.02).collect()
        })
        .collect();
    // Fine-tune of the last layer only.
    let mut finetune = base_w.clone();
    if let Some(last) = finetune.last_mut() {
        for v in last.iter_mut() {
            *v += rng.normal() * 0.02;
        }
    }
    // Sparse update: 1% of the weights change noticeably.
    let mut sparse = base_w.clone();
    for l in sparse.iter_mut() {
        let n = l.len();
        for _ in 0..n / 100 {
            let i = (rng.next() as usize) % n;
            l[i] *= 0.5;
        }
    }
    // Retrain from scratch: unrelated weights.
    let scratch = init(&mut Rng(0x0123_4567_89ab_cdef));

    let inserted: Vec<f64> = (0..4096).map(|_| rng.normal() * 0.3).collect();
    let scenarios: Vec<(&str, Vec<u8>)> = vec![
        ("retrain-warm-start", image(&retrain, None, 0)),
        ("last-layer-fine-tune", image(&finetune, None, 0)),
        ("sparse-update-1pct", image(&sparse, None, 0)),
        ("layer-inserted", image(&base_w, Some(&inserted), 6)),
        ("retrain-from-scratch", image(&scratch, None, 0)),
    ];
    println!(
        "# Patcher<1024> RAM: {} bytes; Patcher<512> (the default block size is {DEFAULT_BLOCK_SIZE}) RAM: {} bytes; Patcher<256> RAM: {} bytes",
        std::mem::size_of::<tinyfleet_device::ota::patch::Patcher<1024>>(),
        std::mem::size_of::<tinyfleet_device::ota::patch::Patcher<512>>(),
        std::mem::size_of::<tinyfleet_device::ota::patch::Patcher<256>>()
    );
    println!("scenario\timage\ttfp1\tlz4_image\ttfp1_512\ttfp1_256");
    for (name, new) in scenarios {
        // 1 KB blocks in the main column (the comparison with detools), then 512 and 256.
        let (patch, _) = diff(&base, &new, 1024).expect("diff");
        let lz4 = lz4_flex::block::compress(&new).len();
        for (ext, bytes) in [("base", &base), ("new", &new), ("tfp1", &patch)] {
            let path = format!("{dir}/{name}.{ext}");
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(bytes))
                .expect("write image");
        }
        let smaller = [512, 256].map(|bs| diff(&base, &new, bs).expect("diff").0.len());
        println!(
            "{name}\t{}\t{}\t{lz4}\t{}\t{}",
            new.len(),
            patch.len(),
            smaller[0],
            smaller[1]
        );
    }
}
