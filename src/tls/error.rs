//! [`TlsError`]: what can go wrong loading, generating or serving a certificate, worded for the
//! administrator (each message names the file and says what to do).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Errors from loading, generating or serving TLS certificates. The messages are meant for the
/// administrator: they name the file involved and say what to do.
#[derive(Debug)]
pub enum TlsError {
    /// A file or directory operation (`action`, e.g. "read the key file") failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A DNS `--hostname` has neither a `.crt` nor a `.key` file in the certificate directory.
    CertFilesMissing {
        hostname: String,
        crt: PathBuf,
        key: PathBuf,
    },
    /// Only one of the `.crt` / `.key` pair exists.
    IncompleteFiles { present: PathBuf, missing: PathBuf },
    /// A file is not valid PEM.
    BadPem { path: PathBuf, detail: String },
    /// The certificate file has no `CERTIFICATE` block.
    NoCertificate { path: PathBuf },
    /// The key file has no private key block.
    NoKey { path: PathBuf },
    /// The first certificate in the file is not a valid X.509 certificate.
    BadCertificate { path: PathBuf, detail: String },
    /// The private key does not belong to the leaf certificate.
    KeyMismatch { crt: PathBuf, key: PathBuf },
    /// The leaf is not valid for `--hostname` by Go's `VerifyHostname` rules; `names` are the
    /// DNS and IP SANs it does cover.
    HostnameMismatch {
        path: PathBuf,
        hostname: String,
        names: Vec<String>,
    },
    /// Certificate generation failed.
    Rcgen(rcgen::Error),
    /// `--certmode letsencrypt` cannot start (its settings are unusable).
    Acme(String),
    /// rustls rejected a key or the configuration.
    Rustls {
        context: String,
        source: rustls::Error,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Io {
                action,
                path,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
            TlsError::CertFilesMissing { hostname, crt, key } => write!(
                f,
                "no certificate for --hostname {hostname:?}: {} and {} do not exist; put the PEM \
                 certificate chain and its private key there (only an IP address --hostname gets \
                 a self-signed certificate generated automatically)",
                crt.display(),
                key.display()
            ),
            TlsError::IncompleteFiles { present, missing } => write!(
                f,
                "{} exists but {} does not; provide both the certificate and its key, or remove \
                 {} (for an IP address --hostname a new self-signed pair is then generated)",
                present.display(),
                missing.display(),
                present.display()
            ),
            TlsError::BadPem { path, detail } => {
                write!(f, "{} is not a valid PEM file: {detail}", path.display())
            }
            TlsError::NoCertificate { path } => write!(
                f,
                "{} contains no PEM \"CERTIFICATE\" block; it must hold the certificate chain, \
                 leaf first",
                path.display()
            ),
            TlsError::NoKey { path } => write!(
                f,
                "{} contains no PEM private key (expected \"PRIVATE KEY\", \"EC PRIVATE KEY\" or \
                 \"RSA PRIVATE KEY\")",
                path.display()
            ),
            TlsError::BadCertificate { path, detail } => write!(
                f,
                "the first certificate in {} cannot be parsed: {detail}",
                path.display()
            ),
            TlsError::KeyMismatch { crt, key } => write!(
                f,
                "the private key in {} does not belong to the certificate in {}; install the \
                 matching pair",
                key.display(),
                crt.display()
            ),
            TlsError::HostnameMismatch {
                path,
                hostname,
                names,
            } => {
                let names = if names.is_empty() {
                    "no DNS or IP subject alternative names".to_owned()
                } else {
                    names.join(", ")
                };
                write!(
                    f,
                    "the certificate in {} is not valid for --hostname {hostname:?} (it covers: \
                     {names}); fix --hostname or install a certificate for that name",
                    path.display()
                )
            }
            TlsError::Rcgen(e) => write!(f, "cannot generate a certificate: {e}"),
            TlsError::Acme(e) => f.write_str(e),
            TlsError::Rustls { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Io { source, .. } => Some(source),
            TlsError::Rcgen(e) => Some(e),
            TlsError::Rustls { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Rcgen(e)
    }
}

pub(super) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

pub(super) fn rustls_err(context: impl Into<String>) -> impl FnOnce(rustls::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Rustls { context, source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn error_messages_name_the_file() {
        let err = TlsError::Io {
            action: "read the key file",
            path: PathBuf::from("/etc/derp/x.key"),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot read the key file /etc/derp/x.key: "),
            "{msg}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}
