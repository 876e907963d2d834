//! `--model` / `--reference` arguments that name a Hub repository (`org/name[@revision]`):
//! resolved to a snapshot directory of the Hugging Face cache before a command uses them.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rfid_moe::hub::{HubConfig, ModelSource};

use crate::bars;

/// The local directory for a model argument: the path itself when it exists or is not of the
/// form `org/name[@revision]`, else the Hub repository's cache snapshot (downloaded as needed,
/// with progress bars unless `quiet`; from the cache alone with `HF_HUB_OFFLINE=1`).
pub fn resolve_model(arg: &Path, quiet: bool) -> Result<PathBuf> {
    match ModelSource::classify(arg) {
        ModelSource::Local(path) => Ok(path),
        ModelSource::Hub(repo) => {
            let config = HubConfig::from_env()?;
            let progress = bars::observer(quiet);
            rfid_moe::hub::download_model(&config, &repo, progress.as_ref()).map_err(|error| {
                // The user may have meant a local directory that is not there.
                anyhow::anyhow!(
                    "{}: no such local file or directory, and as a Hub repository id: {error}",
                    arg.display()
                )
            })
        }
    }
}

/// [`resolve_model`] for an optional argument.
pub fn resolve_optional(arg: Option<&Path>, quiet: bool) -> Result<Option<PathBuf>> {
    arg.map(|a| resolve_model(a, quiet)).transpose()
}
