//! The tokenizer as llama.cpp reads it (`tokenizer.ggml.*`), from `tokenizer.json` and
//! `tokenizer_config.json`: byte-level BPE vocabularies (`gpt2` in llama.cpp's terms) with
//! their merges, token types and special tokens, and the pre-tokenizer named for the splitting
//! rules llama.cpp knows.

use std::path::Path;

use serde_json::Value;

use super::encode::MetaValue;
use crate::error::{Error, Result};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNUSED: i32 = 5;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The GPT-2 splitting rule (a `ByteLevel` pre-tokenizer with `use_regex`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Splitting rules (a `Split` pre-tokenizer's regex) llama.cpp knows, with its name for each.
const KNOWN_SPLITS: [(&str, &str); 3] = [
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2",
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "llama-bpe",
    ),
    (GPT2_REGEX, "gpt-2"),
];

fn unsupported(path: &Path, what: String) -> Error {
    Error::InvalidArgument(format!(
        "{}: {what}; llama.cpp could not tokenise like this tokenizer, so no GGUF is written \
         (byte-level BPE tokenizers with the GPT-2, Qwen2 or Llama-3 splitting rules are \
         supported)",
        path.display()
    ))
}

/// The pre-tokenizer name llama.cpp gives `pre` (a `tokenizer.json` `pre_tokenizer`).
fn pre_tokenizer_name(path: &Path, pre: &Value) -> Result<&'static str> {
    let kind = pre.get("type").and_then(Value::as_str).unwrap_or("none");
    match kind {
        "ByteLevel" if pre.get("use_regex").and_then(Value::as_bool) != Some(false) => Ok("gpt-2"),
        "Sequence" => {
            let steps = pre
                .get("pretokenizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let regexes: Vec<&str> = steps
                .iter()
                .filter(|s| s.get("type").and_then(Value::as_str) == Some("Split"))
                .filter_map(|s| s.pointer("/pattern/Regex").and_then(Value::as_str))
                .collect();
            let byte_level = steps
                .iter()
                .any(|s| s.get("type").and_then(Value::as_str) == Some("ByteLevel"));
            match (regexes.as_slice(), byte_level) {
                ([regex], true) => KNOWN_SPLITS
                    .iter()
                    .find(|(known, _)| known == regex)
                    .map(|(_, name)| *name)
                    .ok_or_else(|| {
                        unsupported(
                            path,
                            format!("its splitting rule `{regex}` is not one llama.cpp names"),
                        )
                    }),
                _ => Err(unsupported(
                    path,
                    format!(
                        "its pre-tokenizer sequence ({} steps) is not a split then byte-level",
                        steps.len()
                    ),
                )),
            }
        }
        other => Err(unsupported(path, format!("its pre-tokenizer is `{other}`"))),
    }
}

fn token_id(tokens: &[String], config: &Value, key: &str) -> Option<u32> {
    let entry = config.get(key)?;
    let content = entry
        .as_str()
        .or_else(|| entry.get("content").and_then(Value::as_str))?;
    tokens.iter().position(|t| t == content).map(|i| i as u32)
}

/// The `tokenizer.ggml.*` metadata of the tokenizer in `dir` for a model of `vocab_size` rows
/// (tokens past the tokenizer's are written as unused `[PADn]`, as llama.cpp's converter does);
/// `model_config` supplies special-token ids the tokenizer's own configuration leaves out.
pub fn tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    model_config: &Value,
) -> Result<Vec<(String, MetaValue)>> {
    let path = dir.join(crate::text::TOKENIZER_FILE);
    if !path.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: missing; a GGUF carries the vocabulary (llama.cpp cannot run without it)",
            path.display()
        )));
    }
    let json = crate::checkpoint::read_json(&path)?;
    let model = byte_level_bpe(&path, &json)?;
    let pre = pre_tokenizer_name(&path, json.get("pre_tokenizer").unwrap_or(&Value::Null))?;
    let (tokens, types) = token_table(&path, &json, model, vocab_size)?;
    let merges = merges(&path, model)?;
    let config_path = dir.join("tokenizer_config.json");
    let tokenizer_config = match config_path.is_file() {
        true => crate::checkpoint::read_json(&config_path)?,
        false => Value::Null,
    };
    let specials = special_ids(dir, &tokens, &tokenizer_config, model_config)?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), MetaValue::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), MetaValue::Strings(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Strings(merges)),
    ];
    out.extend(specials);
    for key in ["add_bos_token", "add_eos_token"] {
        let add = tokenizer_config
            .get(key)
            .and_then(Value::as_bool)
            .unwrap_or(false);
        out.push((format!("tokenizer.ggml.{key}"), MetaValue::Bool(add)));
    }
    if let Some(template) = tokenizer_config
        .get("chat_template")
        .and_then(Value::as_str)
    {
        out.push((
            "tokenizer.chat_template".into(),
            MetaValue::Str(template.into()),
        ));
    }
    Ok(out)
}

/// The `model` section of a byte-level BPE `tokenizer.json` (refusing any other kind).
fn byte_level_bpe<'a>(path: &Path, json: &'a Value) -> Result<&'a Value> {
    let model = json.get("model").unwrap_or(&Value::Null);
    let kind = model.get("type").and_then(Value::as_str).unwrap_or("none");
    let byte_fallback = model.get("byte_fallback").unwrap_or(&Value::Null);
    if kind != "BPE" || byte_fallback.as_bool() == Some(true) {
        return Err(unsupported(
            path,
            format!("its model is `{kind}` (byte fallback: {byte_fallback})"),
        ));
    }
    Ok(model)
}

/// Every token by id (at least `vocab_size` of them, unfilled ids as unused `[PADn]`) and its
/// llama.cpp type: control for special added tokens, user-defined for other added ones.
fn token_table(
    path: &Path,
    json: &Value,
    model: &Value,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<i32>)> {
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| unsupported(path, "`model.vocab` is not a table of tokens".into()))?;
    let added: &[Value] = json
        .get("added_tokens")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let count = vocab
        .values()
        .chain(added.iter().filter_map(|t| t.get("id")))
        .filter_map(Value::as_u64)
        .map(|id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; count];
    let mut types = vec![NORMAL; count];
    for (text, id) in vocab {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(text.clone());
        }
    }
    for token in added {
        let (Some(id), Some(text)) = (
            token.get("id").and_then(Value::as_u64),
            token.get("content").and_then(Value::as_str),
        ) else {
            continue;
        };
        let special = token
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        tokens[id as usize] = Some(text.to_string());
        types[id as usize] = if special { CONTROL } else { USER_DEFINED };
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    Ok((tokens, types))
}

/// The bos/eos/unk/padding ids (from `tokenizer_config.json`'s tokens, else `config.json`'s
/// ids), each checked against the vocabulary.
fn special_ids(
    dir: &Path,
    tokens: &[String],
    tokenizer_config: &Value,
    model_config: &Value,
) -> Result<Vec<(String, MetaValue)>> {
    let mut specials = Vec::new();
    for (key, ggml, config_key) in [
        ("bos_token", "bos_token_id", "bos_token_id"),
        ("eos_token", "eos_token_id", "eos_token_id"),
        ("unk_token", "unknown_token_id", ""),
        ("pad_token", "padding_token_id", "pad_token_id"),
    ] {
        let id = token_id(tokens, tokenizer_config, key).or_else(|| {
            model_config
                .get(config_key)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        });
        match id {
            Some(id) if id as usize >= tokens.len() => {
                return Err(Error::InvalidArgument(format!(
                    "{}: the {key} id {id} is outside the vocabulary of {} tokens (llama.cpp \
                     refuses such a file)",
                    dir.display(),
                    tokens.len()
                )))
            }
            Some(id) => specials.push((format!("tokenizer.ggml.{ggml}"), MetaValue::U32(id))),
            None => {}
        }
    }
    Ok(specials)
}

/// The merges as `"left right"` strings (tokenizer.json holds either form).
fn merges(path: &Path, model: &Value) -> Result<Vec<String>> {
    let Some(list) = model.get("merges").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok(format!("{a} {b}")),
                _ => Err(unsupported(path, format!("merge {m} is not two tokens"))),
            },
            _ => Err(unsupported(
                path,
                format!("merge {m} is not a string or a pair"),
            )),
        })
        .collect()
}
