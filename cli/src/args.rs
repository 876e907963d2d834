//! Option groups and value parsers shared by several commands.

use anyhow::Result;
use candle_core::Device;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use rfid_moe::pipeline::methods::lowrank::allocate::Allocation;
use rfid_moe::pipeline::methods::lowrank::tune::TuneMetric;
use rfid_moe::pipeline::methods::lowrank::{FactorizerKind, RankAllocation};
use rfid_moe::pipeline::methods::prune::Saliency;
use rfid_moe::pipeline::{BudgetScope, BudgetUnit, Granularity};

/// `--device`, flattened into the commands that run a model.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// `cpu` or `cuda` / `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    /// The candle device named by `--device`.
    pub fn device(&self) -> Result<Device> {
        Ok(rfid_moe::pipeline::parse_device(&self.device)?)
    }
}

/// Parses `on`/`off` (or `true`/`false`, `yes`/`no`, `1`/`0`) into a boolean.
pub fn parse_on_off(value: &str) -> std::result::Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        other => Err(format!("expected on or off, got `{other}`")),
    }
}

/// Parses `--xi`: a number in [0, 1], or `auto` (chosen per layer on held-out windows).
pub fn parse_xi(
    value: &str,
) -> std::result::Result<rfid_moe::pipeline::methods::lowrank::tune::XiSetting, String> {
    value.parse().map_err(|e: rfid_moe::Error| e.to_string())
}

/// A library option enum offered on the command line by name.
pub trait Choice: std::str::FromStr<Err = rfid_moe::Error> + Clone + Send + Sync + 'static {
    /// Every value, in the order `--help` lists them.
    fn all() -> &'static [Self];
    /// The name typed on the command line.
    fn name(&self) -> &'static str;
    /// What the value means, for `--help`.
    fn description(&self) -> &'static str;
}

macro_rules! choice {
    ($type:ty) => {
        impl Choice for $type {
            fn all() -> &'static [Self] {
                <$type>::ALL
            }
            fn name(&self) -> &'static str {
                <$type>::name(self)
            }
            fn description(&self) -> &'static str {
                <$type>::description(self)
            }
        }
    };
}

choice!(Allocation);
choice!(RankAllocation);
choice!(BudgetScope);
choice!(BudgetUnit);
choice!(Granularity);
choice!(FactorizerKind);
choice!(Saliency);
choice!(TuneMetric);
choice!(rfid_moe::pipeline::methods::quantise::Algorithm);
choice!(rfid_moe::pipeline::methods::quantise::HessianSource);
choice!(rfid_moe::pipeline::methods::quantise::CandidateErrors);
choice!(rfid_moe::pipeline::OutputFormat);

impl Choice for rfid_moe::checkpoint::experts::ExpertMatrix {
    fn all() -> &'static [Self] {
        &Self::ALL
    }
    fn name(&self) -> &'static str {
        Self::name(self)
    }
    fn description(&self) -> &'static str {
        Self::description(self)
    }
}

/// A value parser for `T` that lists every name and its description in `--help` and parses with
/// the library's `FromStr`.
pub fn choice<T: Choice>() -> impl TypedValueParser<Value = T> {
    let values = T::all()
        .iter()
        .map(|v| PossibleValue::new(v.name()).help(v.description()));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<T>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use rfid_moe::checkpoint::experts::ExpertMatrix;

    #[derive(Parser)]
    struct Probe {
        #[arg(long, value_parser = choice::<Allocation>())]
        allocation: Option<Allocation>,
        #[arg(long, value_parser = choice::<BudgetScope>(), default_value = "layer")]
        budget_scope: BudgetScope,
        #[arg(long, value_delimiter = ',', value_parser = choice::<ExpertMatrix>())]
        matrices: Option<Vec<ExpertMatrix>>,
    }

    #[test]
    fn matrices_parse_as_a_comma_separated_list() {
        let probe = Probe::try_parse_from(["probe", "--matrices", "gate,up,down"]).unwrap();
        assert_eq!(probe.matrices, Some(ExpertMatrix::ALL.to_vec()));
        let probe = Probe::try_parse_from(["probe", "--matrices", "down"]).unwrap();
        assert_eq!(probe.matrices, Some(vec![ExpertMatrix::Down]));
        let error = Probe::try_parse_from(["probe", "--matrices", "gate,w2"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("w2") && error.contains("gate, up, down"),
            "{error}"
        );
    }

    #[test]
    fn choices_parse_every_library_name_and_refuse_others() {
        for &allocation in Allocation::ALL {
            let probe =
                Probe::try_parse_from(["probe", "--allocation", allocation.name()]).unwrap();
            assert_eq!(probe.allocation, Some(allocation));
        }
        let probe = Probe::try_parse_from(["probe", "--budget-scope", "model"]).unwrap();
        assert_eq!(probe.budget_scope, BudgetScope::Model);
        assert_eq!(
            Probe::try_parse_from(["probe"]).unwrap().budget_scope,
            BudgetScope::Layer
        );
        let error = Probe::try_parse_from(["probe", "--allocation", "random"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("random") && error.contains("uniform, frequency, density, rfid"),
            "{error}"
        );
    }

    #[test]
    fn help_lists_every_value_with_its_description() {
        use clap::CommandFactory;
        let help = Probe::command().render_long_help().to_string();
        for allocation in Allocation::ALL {
            assert!(
                help.contains(&format!("{}:", allocation.name()))
                    && help.contains(allocation.description()),
                "{help}"
            );
        }
    }
}
