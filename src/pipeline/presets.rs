//! Named sets of options (`--preset`): the default is [`CompressOptions::default`]; `paper` is
//! the paper's RFID-MoE.

use super::methods::lowrank::LowRankSettings;
use super::options::{BudgetOptions, CalibrationOptions, CompressOptions, GroupSize};
use crate::error::{Error, Result};

/// The presets `--preset` accepts.
pub const NAMES: [&str; 2] = ["default", "paper"];

/// The paper's RFID-MoE (`--preset paper`): low-rank factors of gate and up with the fused-score
/// allocation over groups of four experts, in the checkpoint's dtype, `ratio` a fraction of
/// their parameters per layer, no removal.
pub fn paper() -> CompressOptions {
    let mut options = CompressOptions {
        methods: vec!["lowrank".into(), "keep".into()],
        calibration: CalibrationOptions {
            group_size: GroupSize::Experts(4),
            ..CalibrationOptions::default()
        },
        budget: BudgetOptions::paper(),
        ..CompressOptions::default()
    };
    if let Ok(table) = serde_json::to_value(LowRankSettings::paper()) {
        options.settings.insert("lowrank".into(), table);
    }
    options
}

/// The preset called `name`.
pub fn named(name: &str) -> Result<CompressOptions> {
    match name {
        "default" => Ok(CompressOptions::default()),
        "paper" => Ok(paper()),
        other => Err(Error::InvalidArgument(format!(
            "unknown preset `{other}`: expected one of {}",
            NAMES.join(", ")
        ))),
    }
}
