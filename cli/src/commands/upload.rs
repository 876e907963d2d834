//! `rfid-moe upload`: a compressed output to a Hub repository, with its model card.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rfid_moe::hub::{HubConfig, RepoRef, UploadOptions, Visibility};
use rfid_moe::model_card::{self, CardInputs, CARD_FILE, EVAL_REPORT_FILE};

use crate::bars;

/// `upload` arguments.
#[derive(Args)]
pub struct UploadArgs {
    /// The compressed output directory (as written by `compress --out`).
    dir: PathBuf,
    /// The target repository, `org/name`.
    repo: String,
    /// Create the repository if it does not exist (private unless --public).
    #[arg(long)]
    create: bool,
    /// Make a repository created by --create private (the default).
    #[arg(long, conflicts_with = "public")]
    private: bool,
    /// Make a repository created by --create public.
    #[arg(long)]
    public: bool,
    /// The branch to commit to.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The commit message.
    #[arg(long, default_value = "Upload RFID-MoE compressed model")]
    message: String,
    /// An evaluation report (`eval --json`) for the card's quality table (default:
    /// DIR/eval_report.json when present).
    #[arg(long)]
    eval_report: Option<PathBuf>,
    /// Do not draw and upload the routing-frequency and allocated-rank charts.
    #[arg(long)]
    no_charts: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Checks the directory, builds the card and uploads everything as one commit.
pub fn run(args: &UploadArgs) -> Result<()> {
    let Some(mut repo) = RepoRef::parse(&args.repo).filter(|_| !args.repo.contains('@')) else {
        bail!(
            "`{}` is not a Hub repository id: expected `org/name` (the branch goes in --revision)",
            args.repo
        );
    };
    repo.revision = args.revision.clone();
    rfid_moe::hub::check_upload_dir(&args.dir)?;
    let config = HubConfig::from_env()?;
    let progress = bars::observer(args.quiet);
    let charts_dir = std::env::temp_dir().join(format!("rfid-moe-charts-{}", std::process::id()));
    // A signal during the upload removes the charts with the other temporaries.
    rfid_moe::safety::staging::register_staging(&charts_dir);
    let result = (|| {
        let mut options = UploadOptions {
            repo: repo.clone(),
            create: args.create,
            visibility: if args.public {
                Visibility::Public
            } else {
                Visibility::Private
            },
            message: args.message.clone(),
            overrides: BTreeMap::new(),
            extra: BTreeMap::new(),
        };
        let charts = if args.no_charts {
            Vec::new()
        } else {
            draw_charts(&args.dir, &charts_dir, &mut options.extra)
        };
        if let Some(card) = card(args, &repo, charts)? {
            options
                .overrides
                .insert(CARD_FILE.to_string(), card.into_bytes());
        }
        Ok::<_, anyhow::Error>(rfid_moe::hub::upload_folder(
            &config,
            &args.dir,
            &options,
            progress.as_ref(),
        )?)
    })();
    let _ = std::fs::remove_dir_all(&charts_dir);
    rfid_moe::safety::staging::unregister_staging(&charts_dir);
    let summary = result?;
    println!(
        "uploaded {} files ({} through LFS, {} bytes sent) to {}@{}",
        summary.files.len(),
        summary.lfs_files,
        summary.lfs_bytes_sent,
        repo.id,
        repo.revision
    );
    if let Some(url) = summary.commit_url {
        println!("commit: {url}");
    }
    Ok(())
}

/// The card to upload: regenerated (with the repository id, the evaluation report and the
/// charts) unless DIR holds a card without the generated marker, which is uploaded unchanged.
fn card(args: &UploadArgs, repo: &RepoRef, charts: Vec<String>) -> Result<Option<String>> {
    let existing = args.dir.join(CARD_FILE);
    if let Ok(text) = std::fs::read_to_string(&existing) {
        if !model_card::is_generated(&text) {
            eprintln!(
                "{} was edited by hand (no generated marker): uploading it unchanged",
                existing.display()
            );
            return Ok(None);
        }
    }
    let eval_path = args
        .eval_report
        .clone()
        .or_else(|| Some(args.dir.join(EVAL_REPORT_FILE)).filter(|p| p.is_file()));
    let eval_report = match &eval_path {
        Some(path) => {
            let text = rfid_moe::safety::read_text_bounded(
                path,
                rfid_moe::safety::MAX_JSON_BYTES,
                "an evaluation report (eval --json)",
            )?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an evaluation report", path.display()))?,
            )
        }
        None => None,
    };
    let inputs = CardInputs {
        repo_id: Some(repo.id.clone()),
        eval_report,
        charts,
    };
    Ok(Some(model_card::render_model_card(&args.dir, &inputs)?))
}

/// Draws the compressed model's charts into `scratch` and lists them under `charts/` in the
/// repository; a chart that cannot be drawn is skipped with a warning.
fn draw_charts(dir: &Path, scratch: &Path, extra: &mut BTreeMap<String, PathBuf>) -> Vec<String> {
    if let Err(error) = super::plot::plot_compression(dir, scratch) {
        eprintln!("warning: charts not drawn: {error:#}");
        return Vec::new();
    }
    let mut charts = Vec::new();
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return charts;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for file in files {
        if let Some(name) = file.file_name().and_then(|n| n.to_str()) {
            let in_repo = format!("charts/{name}");
            extra.insert(in_repo.clone(), file.clone());
            charts.push(in_repo);
        }
    }
    charts
}
