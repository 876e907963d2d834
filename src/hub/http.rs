//! HTTP plumbing shared by download and upload: the agent, the token header, URL encoding, and
//! turning the Hub's answers (status, `X-Error-Code`, `X-Error-Message`) into clear errors.

use std::io::Read;
use std::time::Duration;

use super::{HubConfig, Token};
use crate::error::Error;

/// The agent every request goes through (proxy from the environment, redirects followed, the
/// token only ever sent to the host it was meant for).
pub(super) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
        .user_agent(concat!("rfid-moe/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `request` with the token's `Authorization` header, if there is a token.
pub(super) fn authorized(request: ureq::Request, token: Option<&Token>) -> ureq::Request {
    match token {
        Some(token) => request.set("Authorization", &token.bearer()),
        None => request,
    }
}

/// Percent-encodes `text` for one URL path segment (everything but `A-Za-z0-9-_.~`).
pub(super) fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes a file path inside a repository, keeping its `/` separators.
pub(super) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// `scheme://host[:port]` of a URL.
pub(super) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// What a request was for, so that a 404 can say what was not found.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target<'a> {
    /// The repository (and revision) itself.
    Repo { id: &'a str, revision: &'a str },
    /// A file of the repository.
    File {
        id: &'a str,
        revision: &'a str,
        path: &'a str,
    },
    /// Any other call (upload steps).
    Call(&'a str),
}

/// A clear error for a failed request to `url`.
pub(super) fn request_error(
    config: &HubConfig,
    url: &str,
    target: Target,
    error: ureq::Error,
) -> Error {
    let message = match error {
        ureq::Error::Status(status, response) => status_message(config, status, response, target),
        ureq::Error::Transport(transport) => format!(
            "could not reach the Hub endpoint {} ({transport}); check the network, or \
             HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the local cache",
            config.endpoint
        ),
    };
    Error::Hub {
        url: url.to_string(),
        message,
    }
}

fn status_message(
    config: &HubConfig,
    status: u16,
    response: ureq::Response,
    target: Target,
) -> String {
    let code = response.header("x-error-code").unwrap_or("").to_string();
    let hub_message = response
        .header("x-error-message")
        .map(str::to_string)
        .or_else(|| body_message(response))
        .unwrap_or_default();
    let detail = if hub_message.is_empty() {
        String::new()
    } else {
        format!(" (the Hub says: {hub_message})")
    };
    let token = if config.token.is_some() {
        "the token in use (HF_TOKEN or the token file) does not grant access to it"
    } else {
        "no token was sent: set HF_TOKEN or log in with `huggingface-cli login`"
    };
    match (status, code.as_str(), target) {
        (401 | 403, "GatedRepo", _) => format!(
            "HTTP {status}: the repository is gated{detail}; accept its conditions on its Hub \
             page, then use a token of that account ({token})"
        ),
        (401 | 403, _, _) => format!("HTTP {status}: access denied{detail}; {token}"),
        (
            404,
            "RevisionNotFound",
            Target::Repo { id, revision } | Target::File { id, revision, .. },
        ) => {
            format!("HTTP 404: revision `{revision}` not found in {id}{detail}")
        }
        (404, "EntryNotFound", Target::File { id, revision, path }) => {
            format!("HTTP 404: file `{path}` not found in {id}@{revision}{detail}")
        }
        (404, _, Target::Repo { id, .. }) => format!(
            "HTTP 404: repository {id} not found{detail}; check the name, or it is private and \
             {token}"
        ),
        (404, _, Target::File { id, revision, path }) => {
            format!("HTTP 404: file `{path}` not found in {id}@{revision}{detail}")
        }
        (_, _, Target::Call(what)) => format!("HTTP {status} while {what}{detail}"),
        _ => format!("HTTP {status}{detail}"),
    }
}

/// The `error` field of a small JSON error body, if there is one.
fn body_message(response: ureq::Response) -> Option<String> {
    let mut text = String::new();
    response
        .into_reader()
        .take(16 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("error")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_is_scheme_host_and_port() {
        assert_eq!(origin("http://127.0.0.1:8/a/b"), "http://127.0.0.1:8");
        assert_eq!(origin("https://cdn.example"), "https://cdn.example");
    }

    #[test]
    fn paths_and_revisions_are_encoded_per_segment() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("dir/a b.json"), "dir/a%20b.json");
    }
}
