//! The one error type of the reader: what the `error` control message carries.

use std::fmt;

/// The `category` of an `error` message (docs/protocol.md, section 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// The job's `config` is wrong: the user must change the job file.
    Config,
    /// The database failed or refused: unreachable, login, missing table, bad data.
    Source,
    /// A bug or an unexpected failure of the plugin itself.
    Plugin,
    /// The supervisor broke the protocol.
    Protocol,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Config => "config",
            Category::Source => "source",
            Category::Plugin => "plugin",
            Category::Protocol => "protocol",
        }
    }
}

/// A failure of the run, as the user will read it.
#[derive(Clone, Debug)]
pub struct ReadError {
    pub category: Category,
    pub message: String,
    pub transient: bool,
    pub detail: Option<String>,
}

impl ReadError {
    fn new(category: Category, message: impl Into<String>) -> Self {
        ReadError {
            category,
            message: message.into(),
            transient: false,
            detail: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Category::Config, message)
    }

    pub fn source(message: impl Into<String>) -> Self {
        Self::new(Category::Source, message)
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Self::new(Category::Protocol, message)
    }

    pub fn plugin(message: impl fmt::Display) -> Self {
        Self::new(Category::Plugin, message.to_string())
    }

    /// Retrying the same run later may succeed (a database that is down, say).
    pub fn transient(mut self) -> Self {
        self.transient = true;
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// True when the supervisor hung up: nobody is left to tell.
    pub fn is_hang_up(&self) -> bool {
        self.category == Category::Plugin && self.detail.as_deref() == Some("hang-up")
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.category.as_str(), self.message)
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        let hang_up = matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
        );
        let error = ReadError::plugin(format!("plugin socket: {e}"));
        if hang_up {
            error.with_detail("hang-up")
        } else {
            error
        }
    }
}
