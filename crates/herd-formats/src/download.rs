//! HTTP downloads shared by the hub and package-index clients: one agent configuration (the
//! platform's certificate store, so a proxy or mirror with its own CA works as it does for
//! curl and pip) and resumable, checksum-verified downloads.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::hub::commit_verified;
use crate::{Error, Result};

/// An HTTP agent that hands non-2xx answers back as responses (callers word the errors) and
/// verifies TLS certificates against the platform's trust store (`SSL_CERT_FILE` /
/// `SSL_CERT_DIR` and the system bundle on Linux).
pub(crate) fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls)
        .build()
        .into()
}

pub(crate) fn download_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Download(format!("{what}: {e}"))
}

/// Download `url` to `dest` through `{dest}.partial`: an existing partial file is resumed with a
/// `Range` request (`request(Some("bytes=N-"))`; a server that answers 200 instead of 206 starts
/// it over, and so does one whose 206 starts elsewhere or that answers 416, as for a partial
/// file already whole or longer than the file now is), `progress(done, total)` is called as
/// bytes arrive, and the file is renamed into place only once complete and, when
/// `sha256(response)` names a digest, equal to it (a mismatch deletes it). `request` must hand
/// back 416 answers to ranged requests rather than fail on them. Shared by the hub and
/// package-index clients.
pub(crate) fn download_resumable(
    url: &str,
    dest: &Path,
    request: impl Fn(Option<String>) -> Result<ureq::http::Response<ureq::Body>>,
    sha256: impl FnOnce(&ureq::http::Response<ureq::Body>) -> Option<String>,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    let have = std::fs::metadata(&partial).map_or(0, |m| m.len());
    let mut resp = request((have > 0).then(|| format!("bytes={have}-")))?;
    let resumable = match resp.status().as_u16() {
        206 => content_range_start(&resp) == Some(have),
        416 => false,
        _ => true,
    };
    if have > 0 && !resumable {
        resp = request(None)?;
    }
    if !matches!(resp.status().as_u16(), 200 | 206) {
        return Err(download_err(
            url,
            format!("HTTP {}", resp.status().as_u16()),
        ));
    }
    let resumed = resp.status().as_u16() == 206 && have > 0;
    let want = sha256(&resp);
    let len: u64 = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let start = if resumed { have } else { 0 };
    let total = start + len;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&partial)
        .map_err(|e| download_err(&partial.display().to_string(), e))?;
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = start;
    loop {
        let n = reader.read(&mut buf).map_err(|e| download_err(url, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| download_err(&partial.display().to_string(), e))?;
        done += n as u64;
        progress(done, total);
    }
    out.flush()
        .map_err(|e| download_err(&partial.display().to_string(), e))?;
    drop(out);
    commit_verified(&partial, dest, want.as_deref())
}

/// The first byte of a 206 answer's `Content-Range: bytes START-END/TOTAL`.
fn content_range_start(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers()
        .get("content-range")?
        .to_str()
        .ok()?
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}
