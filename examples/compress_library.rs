//! Compress the bundled model through the library API and print the summary table.
//! `cargo run --example compress_library -- /tmp/mini-rfid`

use rfid_moe::{compress, CompressOptions};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/mini-rfid-example".into());
    let mut options = CompressOptions {
        model: "models/mini-moe-docs".into(),
        ..CompressOptions::default()
    };
    options.calibration.data = "models/mini-moe-docs/calibration.txt".into();
    options.calibration.samples = 32;
    options.calibration.seq_len = 256;
    options.budget.ratio = 0.4;
    options.output.out = Some(out.into());
    options.output.force = true;
    let report = compress(&options)?;
    println!("{}", report.table());
    Ok(())
}
