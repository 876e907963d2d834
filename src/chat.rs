//! Chat prompts: the model's own chat template (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`) rendered with minijinja the way transformers' `apply_chat_template`
//! renders it with Jinja2 (blocks trimmed, Python string methods, `raise_exception`, `tojson`).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::safety::{read_text_bounded, MAX_JSON_BYTES};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A turn by `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    path: PathBuf,
    /// Every special token of the tokenizer config by key (`bos_token`, `eos_token`,
    /// `pad_token`, ...), as transformers passes them to the template.
    special_tokens: std::collections::BTreeMap<String, String>,
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ChatTemplate {
    /// The chat template of the model in `dir`; `None` when the model has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.exists() {
            let text = read_text_bounded(&config_path, MAX_JSON_BYTES, "a tokenizer_config.json")?;
            serde_json::from_str(&text).map_err(|e| Error::Json {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            serde_json::Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, path) = if jinja_path.exists() {
            let text = read_text_bounded(&jinja_path, MAX_JSON_BYTES, "a chat template")?;
            (text, jinja_path)
        } else {
            match Self::from_tokenizer_config(&config, &config_path)? {
                Some(source) => (source, config_path),
                None => return Ok(None),
            }
        };
        let special_tokens = config
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| key.ends_with("_token"))
            .filter_map(|(key, _)| Some((key.clone(), special_token(&config, key)?)))
            .collect();
        Ok(Some(Self {
            source,
            path,
            special_tokens,
        }))
    }

    /// A template given as text, with the special tokens it refers to.
    pub fn from_source(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        let special_tokens = [("bos_token", bos_token), ("eos_token", eos_token)]
            .into_iter()
            .filter_map(|(key, token)| Some((key.to_owned(), token?.to_owned())))
            .collect();
        Self {
            source: source.into(),
            path: PathBuf::from("<chat template>"),
            special_tokens,
        }
    }

    /// `chat_template` of a tokenizer config: a string, or a list of named templates of which
    /// the one named `default` is used.
    fn from_tokenizer_config(config: &serde_json::Value, path: &Path) -> Result<Option<String>> {
        match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned))
                .map(Some)
                .ok_or_else(|| Error::Json {
                    path: path.to_path_buf(),
                    message: "`chat_template` is a list without a template named `default`".into(),
                }),
            Some(other) => Err(Error::Json {
                path: path.to_path_buf(),
                message: format!(
                    "`chat_template` must be a string or a list of named templates, found {other}"
                ),
            }),
        }
    }

    /// The prompt text for `messages`, ending with the assistant's opening when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", python_tojson);
        let failed = |e: minijinja::Error| Error::InvalidInput {
            path: self.path.clone(),
            message: format!("the chat template failed: {e:#}"),
        };
        env.add_template("chat", &self.source).map_err(failed)?;
        let template = env.get_template("chat").map_err(failed)?;
        let mut context: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(key, token)| (key.clone(), Value::from(token.as_str())))
            .collect();
        for key in ["bos_token", "eos_token"] {
            context.entry(key.into()).or_insert_with(|| Value::from(""));
        }
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        template.render(context).map_err(failed)
    }
}

/// Jinja2's `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False)` with
/// Python's `", "` and `": "` separators and keys in their given order, or indented by `indent`.
fn python_tojson(
    value: Value,
    options: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = options.get("indent")?;
    // Other `json.dumps` options (sort_keys, separators) are refused rather than ignored.
    options.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Appends `value` to `out` in the layout of Python's `json.dumps`.
fn write_python_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    let (open, close, is_map) = match value.kind() {
        ValueKind::Seq | ValueKind::Iterable => ('[', ']', false),
        ValueKind::Map => ('{', '}', true),
        _ => {
            let scalar = serde_json::to_string(value).map_err(|e| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
            })?;
            out.push_str(&scalar);
            return Ok(());
        }
    };
    out.push(open);
    let mut empty = true;
    for (i, item) in value.try_iter()?.enumerate() {
        empty = false;
        if i > 0 {
            out.push_str(separator);
        }
        newline(out, depth + 1);
        if is_map {
            write_python_json(&Value::from(item.to_string()), None, 0, out)?;
            out.push_str(": ");
            write_python_json(&value.get_item(&item)?, indent, depth + 1, out)?;
        } else {
            write_python_json(&item, indent, depth + 1, out)?;
        }
    }
    if !empty {
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ChatML template of Qwen2/Qwen2.5-style models.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_as_transformers_does() {
        let template = ChatTemplate::from_source(CHATML, None, Some("<|im_end|>"));
        let text = template
            .render(&[ChatMessage::new("user", "Hi there")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = template
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_namespace_and_raise_exception_work() {
        let source = "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.content.startswith('x') %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}|{{ messages[0].content.split('-')[1].strip() }}{% if messages|length > 2 %}{{ raise_exception('too many turns') }}{% endif %}";
        let template = ChatTemplate::from_source(source, None, None);
        let text = template
            .render(
                &[
                    ChatMessage::new("user", "a- b "),
                    ChatMessage::new("assistant", "xyz"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(text, "1|b");
        let error = template
            .render(&vec![ChatMessage::new("user", "a-b"); 3], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("too many turns"), "{error}");
    }

    #[test]
    fn tojson_follows_python_json_dumps() {
        let template = ChatTemplate::from_source("{{ messages[0] | tojson }}", None, None);
        let text = template
            .render(&[ChatMessage::new("user", "é <b>")], false)
            .unwrap();
        assert_eq!(text, r#"{"role": "user", "content": "é <b>"}"#);
        let template =
            ChatTemplate::from_source("{{ [1, [], {}] | tojson(indent=2) }}", None, None);
        assert_eq!(
            template.render(&[], false).unwrap(),
            "[\n  1,\n  [],\n  {}\n]"
        );
    }

    #[test]
    fn templates_load_from_either_file_and_named_lists() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
        let config = serde_json::json!({
            "eos_token": {"content": "</s>"},
            "pad_token": "<pad>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}D"}],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let template = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "</s>D");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "J{{ eos_token }}{{ pad_token }}{{ bos_token }}",
        )
        .unwrap();
        let template = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "J</s><pad>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let error = ChatTemplate::load(dir.path())
            .unwrap()
            .unwrap()
            .render(&[], false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("chat_template.jinja"), "{error}");
    }
}
