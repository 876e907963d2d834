//! Per-layer figures from whole-model timings, and the printed table.

use serde::Serialize;

use crate::measure::Timings;

/// One runtime on one checkpoint, per decoder layer.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `rfid-moe` or `candle-transformers`.
    pub runtime: String,
    /// `original`, `rho-0.4`, ...
    pub checkpoint: String,
    /// Bytes of the routed experts per layer, in the run's dtype.
    pub expert_bytes_per_layer: u64,
    /// Prefill of the context at batch 1, ms per layer.
    pub prefill_ms_per_layer: f64,
    /// Per batch size: one decode step (one token per sequence), ms per layer.
    pub decode_ms_per_layer: Vec<(usize, f64)>,
    /// The whole model with all its layers.
    pub with_layers: Timings,
    /// The same runtime with no decoder layer (embedding, final norm, head).
    pub without_layers: Timings,
}

impl Row {
    /// Per-layer figures `(T(layers) − T(0)) / layers` of a runtime's two timings.
    pub fn new(
        runtime: &str,
        checkpoint: &str,
        expert_bytes_per_layer: u64,
        layers: usize,
        with_layers: Timings,
        without_layers: Timings,
    ) -> Self {
        let per_layer = |full: f64, ends: f64| (full - ends) / layers as f64;
        let decode_ms_per_layer = with_layers
            .decode_ms
            .iter()
            .zip(&without_layers.decode_ms)
            .map(|(&(batch, full), &(_, ends))| (batch, per_layer(full, ends)))
            .collect();
        Self {
            runtime: runtime.into(),
            checkpoint: checkpoint.into(),
            expert_bytes_per_layer,
            prefill_ms_per_layer: per_layer(with_layers.prefill_ms, without_layers.prefill_ms),
            decode_ms_per_layer,
            with_layers,
            without_layers,
        }
    }

    /// Decode ms per layer at `batch`, if measured.
    pub fn decode_at(&self, batch: usize) -> Option<f64> {
        self.decode_ms_per_layer
            .iter()
            .find(|(b, _)| *b == batch)
            .map(|(_, ms)| *ms)
    }
}

/// `reference / ms` (how many times faster than the reference), or `-` when either is missing.
fn speedup(reference: Option<f64>, ms: Option<f64>) -> String {
    match (reference, ms) {
        (Some(r), Some(m)) if m > 0.0 => format!("{:.2}×", r / m),
        _ => "-".into(),
    }
}

/// The table: per row, expert memory, prefill and decode per layer, and speed-ups against
/// candle-transformers and against our original (reference time / this time; > 1 is faster).
pub fn table(rows: &[Row], batches: &[usize], context: usize) -> String {
    let find = |runtime: &str| {
        rows.iter()
            .find(|r| r.runtime == runtime && r.checkpoint == "original")
    };
    let (anchor, ours) = (find("candle-transformers"), find("rfid-moe"));
    let mut header =
        format!("| runtime | checkpoint | experts MiB/layer | prefill {context} ms/layer |");
    let mut rule = String::from("| --- | --- | ---: | ---: |");
    for b in batches {
        header +=
            &format!(" decode b={b} ms/layer | vs candle-tr. b={b} | vs our original b={b} |");
        rule += " ---: | ---: | ---: |";
    }
    let mut out = format!("{header}\n{rule}\n");
    for row in rows {
        out += &format!(
            "| {} | {} | {:.1} | {:.2} |",
            row.runtime,
            row.checkpoint,
            row.expert_bytes_per_layer as f64 / (1u64 << 20) as f64,
            row.prefill_ms_per_layer
        );
        for &b in batches {
            let ms = row.decode_at(b);
            out += &format!(
                " {} | {} | {} |",
                ms.map_or("-".into(), |m| format!("{m:.3}")),
                speedup(anchor.and_then(|a| a.decode_at(b)), ms),
                speedup(ours.and_then(|o| o.decode_at(b)), ms)
            );
        }
        out.push('\n');
    }
    out
}
