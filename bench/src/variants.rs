//! The checkpoints the decode benchmark measures (`decode --variants`), each named by a short
//! spec so that a script can keep its list of checkpoints as data:
//!
//! - `anchor`: candle-transformers' `qwen3_moe` on the original's shards;
//! - `original`: the original in rfid-moe's runtime;
//! - `lowrank:ρ`: gate and up factored at parameter ratio ρ (random factors at the ranks of
//!   `compress --allocation uniform`, [`crate::compressed`]);
//! - `prune-lowrank:ρ`: the experts `--method prune+lowrank` removes at ρ removed, the kept ones
//!   factored at the ratio left ([`PrunePlan`]);
//! - `method:NAME[:ρ]`: the original compressed by `rfid_moe::compress` with the one registered
//!   method NAME at byte ratio ρ (default 0: every expert takes the method). Quantisers need no
//!   SVD, so a real run is quick; a name this build's registry lacks is refused with the list.
//! - `quantise:SCHEME`: every routed expert matrix in one block format (`int4-g128-sym`, `q4_k`,
//!   ...; rounded to nearest: the decode speed does not depend on which codes are stored).

use std::path::Path;
use std::str::FromStr;

use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::pipeline::methods::prune::{default_removal, RoutingLimits};
use rfid_moe::pipeline::methods::quantise::{Algorithm, QuantiseSettings};
use rfid_moe::pipeline::{BudgetUnit, CalibrationOptions, CompressOptions, OutputOptions};

/// One entry of `decode --variants`.
#[derive(Debug, Clone, PartialEq)]
pub enum VariantSpec {
    /// candle-transformers' `qwen3_moe` on the original.
    Anchor,
    /// The original in rfid-moe's runtime.
    Original,
    /// Gate and up factored at parameter ratio ρ.
    LowRank(f64),
    /// Experts pruned, the kept ones factored, at parameter ratio ρ over gate and up.
    PrunedLowRank(f64),
    /// The original compressed by one registered method at byte ratio `ratio`.
    Method {
        /// The registry name.
        name: String,
        /// Fraction of the routed experts' bytes removed (0: no budget pressure).
        ratio: f64,
    },
    /// Every routed expert matrix quantised to one block format.
    Quantised(String),
}

/// Parses a ratio in [0, 1) for `spec`.
fn ratio(text: &str, spec: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "`{spec}`: the ratio `{text}` must be a number in [0, 1)"
        )),
    }
}

impl FromStr for VariantSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        Ok(match parts.as_slice() {
            ["anchor"] => Self::Anchor,
            ["original"] => Self::Original,
            ["lowrank", r] => Self::LowRank(ratio(r, spec)?),
            ["prune-lowrank", r] => Self::PrunedLowRank(ratio(r, spec)?),
            ["method", name] if !name.is_empty() => Self::Method {
                name: name.to_string(),
                ratio: 0.0,
            },
            ["method", name, r] if !name.is_empty() => Self::Method {
                name: name.to_string(),
                ratio: ratio(r, spec)?,
            },
            ["quantise", scheme] => match rfid_moe::quant::Scheme::parse(scheme) {
                Ok(_) => Self::Quantised(scheme.to_string()),
                Err(e) => return Err(format!("`{spec}`: {e}")),
            },
            _ => {
                return Err(format!(
                    "unknown variant `{spec}`: expected anchor, original, lowrank:RATIO, \
                     prune-lowrank:RATIO, method:NAME[:RATIO] or quantise:SCHEME"
                ))
            }
        })
    }
}

impl VariantSpec {
    /// The checkpoint's label in tables and JSON (the anchor runs on `original`).
    pub fn label(&self) -> String {
        match self {
            Self::Anchor | Self::Original => "original".into(),
            Self::LowRank(r) => format!("rho-{r}"),
            Self::PrunedLowRank(r) => format!("prune-rho-{r}"),
            Self::Method { name, ratio } if *ratio == 0.0 => name.clone(),
            Self::Method { name, ratio } => format!("{name}-rho-{ratio}"),
            Self::Quantised(scheme) => scheme.clone(),
        }
    }
}

/// What `--method prune+lowrank` does at parameter ratio ρ over gate and up when the removal is
/// split off the budget as the earlier fixed split did (`pipeline::legacy`): it removes
/// `round(ρ·n/3)` experts (at most n/8, rounded to what routing allows) and factors the kept
/// ones at `ρ' = (ρn − 1.5m)/(n − m)`, since a removed expert frees its down projection too
/// (half of its gate and up). The stored expert parameters are then `(1−ρ)·gate/up + down` of
/// the original, as at the same ρ without pruning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrunePlan {
    /// Experts per layer before pruning.
    pub experts: usize,
    /// Experts removed per layer.
    pub removed: usize,
    /// The parameter ratio the kept experts' gate and up are factored at.
    pub lowrank_ratio: f64,
}

impl PrunePlan {
    /// The plan at parameter ratio `ratio` for `original`'s routing.
    pub fn new(original: &Checkpoint, ratio: f64) -> anyhow::Result<Self> {
        let limits = RoutingLimits::of(original)?;
        let n = limits.experts;
        let wanted = default_removal(BudgetUnit::Parameters, ratio, (n, 2), (2.0, None));
        let removed = limits.largest_valid_removal(wanted);
        anyhow::ensure!(
            removed > 0,
            "prune-lowrank:{ratio}: {n} experts per layer leave nothing to prune at this ratio"
        );
        let (n, m) = (n as f64, removed as f64);
        let lowrank_ratio = (ratio * n - 1.5 * m) / (n - m);
        anyhow::ensure!(
            (0.0..1.0).contains(&lowrank_ratio),
            "prune-lowrank:{ratio}: the kept experts would be factored at {lowrank_ratio}"
        );
        Ok(Self {
            experts: limits.experts,
            removed,
            lowrank_ratio,
        })
    }

    /// Experts per layer after pruning.
    pub fn kept(&self) -> usize {
        self.experts - self.removed
    }
}

/// The registered methods (name, description) of this build.
pub fn registered_methods() -> Vec<(&'static str, &'static str)> {
    rfid_moe::pipeline::Registry::<rfid_moe::linalg::CpuBackend>::builtin()
        .entries()
        .iter()
        .map(|e| (e.name, e.description))
        .collect()
}

/// Compresses `original` into the new directory `out` with the single method `name` at byte
/// ratio `ratio` over all three expert matrices (with `scheme`, the quantiser in that one
/// format, rounded to nearest), calibrating on `device` with a few random windows written to
/// `calibration` (quantisers read few statistics; the decode speed does not depend on them).
pub fn compress_with_method(
    original: &Path,
    (name, ratio, scheme): (&str, f64, Option<&str>),
    calibration: &Path,
    device: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let known = registered_methods();
    anyhow::ensure!(
        known.iter().any(|(n, _)| *n == name),
        "method `{name}` is not in this build's registry ({})",
        known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    );
    let checkpoint = Checkpoint::open(original)?;
    let vocab = checkpoint
        .config()
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow::anyhow!("{}: no vocab_size", original.display()))?;
    let (samples, seq_len) = (2, 64);
    crate::synthetic::write_token_windows(calibration, samples, seq_len, vocab as usize)?;
    let mut options = CompressOptions {
        model: original.to_path_buf(),
        device: device.into(),
        methods: vec![name.to_string()],
        calibration: CalibrationOptions {
            data: calibration.to_path_buf(),
            samples,
            seq_len,
            ..CalibrationOptions::default()
        },
        output: OutputOptions {
            out: Some(out.to_path_buf()),
            ..OutputOptions::default()
        },
        ..CompressOptions::default()
    };
    options.budget.ratio = ratio;
    if let Some(scheme) = scheme {
        let scheme = rfid_moe::quant::Scheme::parse(scheme)?;
        options.update_settings::<QuantiseSettings>(|s| {
            s.schemes = vec![scheme];
            s.algorithm = Algorithm::Rtn;
        })?;
    }
    rfid_moe::compress(&options)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_label_as_documented() {
        let parse = |s: &str| s.parse::<VariantSpec>();
        assert_eq!(parse("anchor"), Ok(VariantSpec::Anchor));
        assert_eq!(
            parse("lowrank:0.4").map(|v| v.label()),
            Ok("rho-0.4".into())
        );
        assert_eq!(
            parse("prune-lowrank:0.6").map(|v| v.label()),
            Ok("prune-rho-0.6".into())
        );
        assert_eq!(parse("method:int8").map(|v| v.label()), Ok("int8".into()));
        assert_eq!(
            parse("quantise:q4_k"),
            Ok(VariantSpec::Quantised("q4_k".into()))
        );
        assert!(parse("quantise:int7-g100-sym").is_err());
        assert_eq!(
            parse("method:int8:0.2").map(|v| v.label()),
            Ok("int8-rho-0.2".into())
        );
        for bad in [
            "lowrank",
            "lowrank:1.0",
            "lowrank:x",
            "method:",
            "original:1",
            "q4",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }
}
