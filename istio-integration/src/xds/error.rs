//! Errors of the xDS client and translation; each names the resource or endpoint it is about.
use std::path::PathBuf;

/// A resource istiod sent that meshaccel cannot use. The message names the resource, and is
/// what goes back to istiod as the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("{kind} {name}: {message}")]
    Resource {
        /// `listener`, `cluster` or `endpoints`.
        kind: &'static str,
        /// The resource name (or `#<index>` when it could not even be decoded).
        name: String,
        message: String,
    },
    #[error("{kind} {name} appears twice in one response")]
    Duplicate { kind: &'static str, name: String },
    #[error("config dump: {message}")]
    Dump { message: String },
}

impl TranslateError {
    pub(crate) fn resource(
        kind: &'static str,
        name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Resource {
            kind,
            name: name.into(),
            message: message.into(),
        }
    }
}

/// Why an ADS stream could not be set up or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("istiod address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration for {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to istiod at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("ADS stream to {addr}: {status}")]
    Stream {
        addr: String,
        #[source]
        status: tonic::Status,
    },
    #[error("ADS stream to {addr} closed by istiod")]
    Closed { addr: String },
    #[error("ADS stream to {addr}: no response within {secs} s")]
    Idle { addr: String, secs: u64 },
}

pub type Result<T, E = TranslateError> = std::result::Result<T, E>;
