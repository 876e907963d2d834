//! Compress the bundled model through the library API and print the summary table.
//! `cargo run --example compress_library -- /tmp/mini-rfid`

use rfid_moe::{compress, CompressOptions};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/mini-rfid-example".into());
    let report = compress(&CompressOptions {
        model: "models/mini-moe-docs".into(),
        calibration: "models/mini-moe-docs/calibration.txt".into(),
        out: Some(out.into()),
        ratio: 0.4,
        samples: 32,
        seq_len: 256,
        force: true,
        ..CompressOptions::default()
    })?;
    println!("{}", report.table());
    Ok(())
}
