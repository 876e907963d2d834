//! `rfid-moe generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use rfid_moe::chat::{ChatMessage, ChatTemplate};
use rfid_moe::checkpoint::Checkpoint;
use rfid_moe::generate::{self, GenerateOptions, Sampling, StopReason, TextStream};
use rfid_moe::models::Model;

use crate::args::DeviceArgs;

/// `generate` arguments.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (original or compressed), with its `tokenizer.json`, or a Hub id
    /// `org/name[@revision]` (an existing local path wins).
    #[arg(long)]
    model: PathBuf,
    /// The prompt (for `--chat`, the user's message); it may start with `-`.
    #[arg(long, allow_hyphen_values = true, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this UTF-8 file (`-`: from standard input) instead of --prompt.
    #[arg(long, value_name = "PATH")]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template (tokenizer_config.json / chat_template.jinja).
    #[arg(long)]
    chat: bool,
    /// System message for `--chat`.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability adds up to p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Extra token ids that end generation (besides the model's `eos_token_id`).
    #[arg(long = "stop-token")]
    stop_tokens: Vec<u32>,
    /// Do not stop at the model's `eos_token_id`.
    #[arg(long)]
    ignore_eos: bool,
    /// Weights and activations dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    /// Run a checkpoint compressed with `--residual on` by expanding each residual into a dense
    /// matrix (the memory of the uncompressed expert matrix; refused without this flag).
    #[arg(long)]
    expand_residual: bool,
    /// Print the generated token ids as JSON instead of streaming text.
    #[arg(long)]
    ids: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

fn parse_dtype(name: Option<&str>, device: &Device) -> Result<DType> {
    Ok(match name {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(other) => bail!("--dtype must be f32, bf16 or f16, got `{other}`"),
    })
}

/// Largest prompt read from --prompt-file: 64 MiB.
const MAX_PROMPT_BYTES: u64 = 64 << 20;

/// The prompt: --prompt as given, or the contents of --prompt-file (standard input for `-`).
fn read_prompt(args: &GenerateArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(prompt), _) => Ok(prompt.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            use std::io::Read;
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(MAX_PROMPT_BYTES + 1)
                .read_to_end(&mut bytes)
                .context("--prompt-file -: reading the prompt from standard input")?;
            if bytes.len() as u64 > MAX_PROMPT_BYTES {
                bail!("--prompt-file -: the prompt on standard input is larger than {MAX_PROMPT_BYTES} bytes");
            }
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "--prompt-file -: the prompt on standard input is not UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                )
            })
        }
        (None, Some(path)) => Ok(rfid_moe::safety::read_text_bounded(
            path,
            MAX_PROMPT_BYTES,
            "a UTF-8 prompt",
        )?),
        (None, None) => {
            bail!("no prompt: give --prompt TEXT, or --prompt-file PATH (`-` reads standard input)")
        }
    }
}

/// Refuses a checkpoint whose residual would be expanded to dense matrices, unless asked to.
fn check_residual(checkpoint: &Checkpoint, expand: bool) -> Result<()> {
    let Some(record) = rfid_moe::models::compression_record(checkpoint)? else {
        return Ok(());
    };
    let matrices = record.residual_matrices();
    if matrices > 0 && !expand {
        bail!(
            "{} was compressed with a residual ({matrices} expert matrices carry one). The residual \
             is a random sparse projection that cannot be applied without expanding it into a dense \
             matrix per expert, which takes the memory of the uncompressed matrices and undoes the \
             saving. Pass --expand-residual to run it that way, or compress with --residual off.",
            checkpoint.dir().display()
        );
    }
    Ok(())
}

/// Generates a continuation of the prompt, streaming it to stdout, then prints its speed.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let device = args.device.device()?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let prompt_text = read_prompt(args)?;
    let model_dir = crate::hub::resolve_model(&args.model, false)?;
    let tokenizer = rfid_moe::text::load_tokenizer(&model_dir)?;
    let text = if args.chat {
        let template = ChatTemplate::load(&model_dir)?.with_context(|| {
            format!(
                "{} has no chat template (chat_template.jinja or `chat_template` in tokenizer_config.json): drop --chat",
                args.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &prompt_text));
        template.render(&messages, true)?
    } else {
        prompt_text
    };
    // transformers adds the tokenizer's special tokens to a plain prompt but not to a rendered
    // chat template, which already holds them.
    let prompt = tokenizer
        .encode(text.as_str(), !args.chat)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let mut stop_tokens = if args.ignore_eos {
        Vec::new()
    } else {
        generate::stop_token_ids(&model_dir)?
    };
    stop_tokens.extend(&args.stop_tokens);
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens,
    };
    options.sampling.validate()?;
    let checkpoint = Checkpoint::open(&model_dir)?;
    check_residual(&checkpoint, args.expand_residual)?;
    let model = Model::load(&checkpoint, dtype, &device)?;
    let mut stream = TextStream::new(&tokenizer);
    let mut stdout = std::io::stdout().lock();
    let generation = generate::generate(&model, &prompt, &options, &mut |token| {
        if args.ids {
            return Ok(true);
        }
        Ok(match stream.push(token)? {
            // A closed stdout (`| head`) ends generation quietly.
            Some(text) => stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
                .is_ok(),
            None => true,
        })
    })?;
    if generation.stop == StopReason::Cancelled {
        return Ok(());
    }
    if args.ids {
        writeln!(stdout, "{}", serde_json::to_string(&generation.tokens)?)?;
    } else {
        writeln!(stdout, "{}", stream.finish()?)?;
    }
    stdout.flush()?;
    let reason = match generation.stop {
        StopReason::StopToken => "stop token",
        StopReason::MaxTokens => "max new tokens",
        StopReason::ContextFull => "context full",
        StopReason::Cancelled => "cancelled",
    };
    eprintln!(
        "{} prompt tokens at {:.1} tokens/s; {} new tokens, {:.2} tokens/s after the first ({reason}); \
         key/value cache {:.1} MB; routed experts {:.1} MB",
        generation.prompt_tokens,
        generation.prefill_tokens_per_second(),
        generation.tokens.len(),
        generation.decode_tokens_per_second(),
        generation.kv_cache_bytes as f64 / 1e6,
        generation.routed_expert_bytes as f64 / 1e6,
    );
    Ok(())
}
