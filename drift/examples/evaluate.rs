//! cargo run --release -p tinyfleet-drift --example evaluate -- [devices] [runs]
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut opts = tinyfleet_drift::evaluate::EvalOptions::default();
    if let Some(&d) = args.first() {
        opts.devices = d;
    }
    if let Some(&r) = args.get(1) {
        opts.runs = r;
    }
    let results = tinyfleet_drift::evaluate::run(&opts);
    print!("{}", tinyfleet_drift::evaluate::markdown(&opts, &results));
}
