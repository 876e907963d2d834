//! The library's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in rfid-moe; each message names the file, tensor or key involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or lacks an expected key.
    #[error("{path}: {message}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A safetensors file is malformed (truncated, bad header, offsets or dtypes that lie).
    #[error("{path}: {message}")]
    Safetensors {
        /// The shard file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` not found in checkpoint {dir} (expected by {expected_by})")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
        /// What needed it.
        expected_by: String,
    },
    /// A tensor's shape disagrees with what `config.json` implies.
    #[error("tensor `{name}` in {path}: shape {found:?} disagrees with config.json, which implies {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shard holding it.
        path: PathBuf,
        /// The shape implied by the config.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// `config.json` is missing a key, has a bad value or names an unsupported architecture.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// An input file has the wrong kind, size or content (not a regular file, too large, not UTF-8,
    /// token ids out of range, ...).
    #[error("{path}: {message}")]
    InvalidInput {
        /// The file.
        path: PathBuf,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A file named by a model directory or index would be read from outside it.
    #[error("{path}: {message}")]
    UnsafePath {
        /// The file that names the path (an index, or the directory).
        path: PathBuf,
        /// The entry and where it resolves.
        message: String,
    },
    /// An output of a run would equal, contain or sit inside an input or another output.
    #[error("{0}")]
    PathConflict(String),
    /// The arguments of a call do not make sense together.
    #[error("{0}")]
    InvalidArgument(String),
    /// A numerical routine failed (e.g. an SVD or Cholesky that did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// A request to the Hugging Face Hub (or the endpoint in `HF_ENDPOINT`) failed.
    #[error("{url}: {message}")]
    Hub {
        /// The URL that was tried.
        url: String,
        /// What went wrong and what to do about it.
        message: String,
    },
    /// The local Hugging Face cache lacks what a run needs (offline mode) or could not be used.
    #[error("{path}: {message}")]
    HubCache {
        /// The cache directory or file involved.
        path: PathBuf,
        /// What was missing or wrong.
        message: String,
    },
    /// A resumable run stopped at a safe point after SIGINT/SIGTERM (what it kept, how to go on).
    #[error("interrupted by signal {signal}: {resume_hint}")]
    Interrupted {
        /// The signal number (2 = SIGINT, 15 = SIGTERM).
        signal: i32,
        /// What was kept and how to continue.
        resume_hint: String,
    },
    /// The staging directory of an interrupted run belongs to another model, options or data.
    #[error(
        "{staging} holds an interrupted run with a different {differences}; repeat that run's \
         command to resume it, or pass --restart to discard its finished layers and start over"
    )]
    ResumeMismatch {
        /// The staging directory of the interrupted run.
        staging: PathBuf,
        /// What differs, each with the old and the new value.
        differences: String,
    },
    /// A split run's directory belongs to another model, options or data than the step given.
    #[error(
        "{run} is a split run of a different {differences}; give every step that run's \
         arguments, or plan a new run in another --run directory"
    )]
    RunMismatch {
        /// The run directory.
        run: PathBuf,
        /// What differs, each with the run's and the step's value.
        differences: String,
    },
    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias with the library's error type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
