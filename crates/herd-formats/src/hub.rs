//! Files from a Hugging Face hub (`HF_ENDPOINT`, default huggingface.co; `HF_TOKEN` for gated
//! repositories): whole files downloaded resumably and checked against the hub's SHA-256, or the
//! first bytes of a file (a config, a GGUF header) without downloading the rest.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::download::{download_err, download_resumable};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Hub {
    pub endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
}

fn hub_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Hub(format!("{what}: {e}"))
}

impl Hub {
    /// From `HF_ENDPOINT` and `HF_TOKEN`.
    pub fn from_env() -> Self {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        Self::new(
            &endpoint,
            std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        )
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        let agent = crate::download::agent();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
        }
    }

    /// A GGUF file's header, fetched by growing prefixes (1 MiB, doubling up to 256 MiB) rather
    /// than downloading the file.
    pub fn gguf_header(&self, repo: &str, file: &str) -> Result<crate::GgufFile> {
        let label = format!("hf:{repo}:{file}");
        let mut n = 1u64 << 20;
        loop {
            let (bytes, total) = self.head_bytes(repo, file, n)?;
            match crate::GgufFile::from_prefix(&label, &bytes, total) {
                Ok(f) => return Ok(f),
                Err(Error::Gguf { reason, .. })
                    if reason.starts_with("truncated")
                        && (bytes.len() as u64) < total
                        && n < (256 << 20) =>
                {
                    n *= 4;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Every file of a repository (`GET /api/models/{repo}`: its `siblings`), paths relative
    /// to the repository root.
    pub fn list_files(&self, repo: &str) -> Result<Vec<String>> {
        let url = format!("{}/api/models/{repo}", self.endpoint);
        let mut resp = self.get(&url, None)?;
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(64 << 20)
            .read_to_end(&mut body)
            .map_err(|e| hub_err(&url, e))?;
        let info: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| hub_err(&url, e))?;
        let siblings = info["siblings"]
            .as_array()
            .ok_or_else(|| Error::Hub(format!("{url}: no file list (siblings) in the answer")))?;
        Ok(siblings
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
            .collect())
    }

    /// The download URL of `file` (a `/`-separated path in the repository), each path segment
    /// percent-encoded so that spaces, `#`, `?` or `%` in a name reach the hub as written.
    pub fn url(&self, repo: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/main/{}",
            self.endpoint,
            encode_path(repo),
            encode_path(file)
        )
    }

    fn get(&self, url: &str, range: Option<String>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let ranged = range.is_some();
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let resp = req.call().map_err(|e| hub_err(url, e))?;
        match resp.status().as_u16() {
            200 | 206 => Ok(resp),
            // Said to a ranged request; the caller decides (a resumed download starts over).
            416 if ranged => Ok(resp),
            401 | 403 => Err(Error::Hub(format!(
                "{url}: access denied (gated or private: set HF_TOKEN)"
            ))),
            404 => Err(Error::Hub(format!("{url}: not found"))),
            code => Err(Error::Hub(format!("{url}: HTTP {code}"))),
        }
    }

    /// The first `n` bytes of a file (fewer if it is shorter), and the file's total length.
    pub fn head_bytes(&self, repo: &str, file: &str, n: u64) -> Result<(Vec<u8>, u64)> {
        let url = self.url(repo, file);
        let mut resp = self.get(&url, Some(format!("bytes=0-{}", n.saturating_sub(1))))?;
        let total = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.parse().ok());
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(n)
            .read_to_end(&mut body)
            .map_err(|e| hub_err(&url, e))?;
        let total = total.unwrap_or(body.len() as u64);
        Ok((body, total))
    }

    /// A whole (small) file.
    pub fn read(&self, repo: &str, file: &str) -> Result<Vec<u8>> {
        let url = self.url(repo, file);
        let mut resp = self.get(&url, None)?;
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .read_to_end(&mut body)
            .map_err(|e| hub_err(&url, e))?;
        Ok(body)
    }

    /// Download to `dest`, resuming a `.partial` left by an earlier attempt, verifying the
    /// SHA-256 the hub reports for large files (`X-Linked-ETag` / `ETag`), and renaming into place
    /// only when complete. `progress(done, total)` is called as bytes arrive.
    pub fn download(
        &self,
        repo: &str,
        file: &str,
        dest: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<PathBuf> {
        let url = self.url(repo, file);
        download_resumable(
            &url,
            dest,
            |range| self.get(&url, range),
            |resp| {
                ["x-linked-etag", "etag"]
                    .iter()
                    .find_map(|h| resp.headers().get(*h).and_then(|v| v.to_str().ok()))
                    .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
                    .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
            },
            progress,
        )
        .map_err(|e| match e {
            Error::Download(m) if !m.contains(&url) => Error::Hub(format!("{url}: {m}")),
            Error::Download(m) => Error::Hub(m),
            e => e,
        })?;
        Ok(dest.to_path_buf())
    }
}

/// Characters a URL path segment keeps as they are: RFC 3986's unreserved set.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `path` with each `/`-separated segment percent-encoded.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// Move a finished download `partial` to `dest` if its SHA-256 is `sha256` (when one is known);
/// on a mismatch delete it, so nothing incomplete or corrupt ever looks like a finished file.
pub fn commit_verified(partial: &Path, dest: &Path, sha256: Option<&str>) -> Result<()> {
    if let Some(want) = sha256 {
        let got = sha256_file(partial)?;
        if got != want {
            let _ = std::fs::remove_file(partial);
            return Err(Error::Download(format!(
                "{}: checksum mismatch (got {got}, expected {want}); the download was removed",
                dest.display()
            )));
        }
    }
    std::fs::rename(partial, dest).map_err(|e| download_err(&dest.display().to_string(), e))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| download_err(&path.display().to_string(), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| download_err(&path.display().to_string(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The GGUF files of a repository listing that hold quantization `quant` (`Q4_K_M`, `IQ2_XXS`,
/// …, case-insensitive, as llama.cpp's `-hf org/repo:quant` takes it): one file, or every shard
/// of one split set (in order). The name must appear as a whole token of a file or directory
/// name (`…-Q4_K_M.gguf`, `Q4_K_M/…-00001-of-00002.gguf`; `Q4_K` does not match `Q4_K_M`);
/// multimodal projector files (`mmproj`) are skipped.
///
/// # Errors
/// [`Error::Hub`] listing the quantizations the repository has when none matches, or the
/// candidates when several different files or sets do.
pub fn pick_quantization(repo: &str, files: &[String], quant: &str) -> Result<Vec<String>> {
    // Candidates grouped by split set: a shard's group is its name without -NNNNN-of-MMMMM,
    // and its count.
    let mut groups: Vec<((String, usize), Vec<String>)> = Vec::new();
    for f in files
        .iter()
        .filter(|f| is_model_gguf(f) && has_token(f, quant))
    {
        let key = (
            split_stem(f).unwrap_or(f.as_str()).to_string(),
            split_count(f).unwrap_or(0),
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(f.clone()),
            None => groups.push((key, vec![f.clone()])),
        }
    }
    match groups.len() {
        1 => {
            let (_, members) = groups.pop().expect("one group");
            complete_set(repo, members)
        }
        0 => {
            let available = quantizations(files);
            Err(Error::Hub(format!(
                "hf:{repo}: no GGUF file for {quant:?}; the repository has {}",
                if available.is_empty() {
                    "no GGUF files".to_string()
                } else {
                    available.join(", ")
                }
            )))
        }
        _ => Err(Error::Hub(format!(
            "hf:{repo}:{quant} matches several files or sets: {}; name the file",
            groups
                .iter()
                .map(|(_, m)| m[0].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Whether a listed file is a model's GGUF (not a projector, imatrix or draft-model file, which
/// llama.cpp's `-hf` skips too).
fn is_model_gguf(f: &str) -> bool {
    let l = f.to_ascii_lowercase();
    let name = l.rsplit('/').next().unwrap_or(&l);
    l.ends_with(".gguf")
        && !l.contains("mmproj")
        && !l.contains("imatrix")
        && !["mtp-", "eagle3-", "dflash-", "dspark-"]
            .iter()
            .any(|p| name.starts_with(p))
}

/// A group of listed files as one download: a single file, or every shard of a split set in
/// order, numbered exactly `1..=count`.
fn complete_set(repo: &str, mut members: Vec<String>) -> Result<Vec<String>> {
    members.sort();
    let Some(count) = members.first().and_then(|m| split_count(m)) else {
        return Ok(members);
    };
    let numbered = members.len() == count
        && members
            .iter()
            .enumerate()
            .all(|(i, m)| split_number(m) == Some(i + 1));
    if !numbered {
        return Err(Error::Hub(format!(
            "hf:{repo}: the split set {} lists {} of its {count} files",
            members[0],
            members.len()
        )));
    }
    Ok(members)
}

/// Whether `name` is a split shard's (`…-NNNNN-of-MMMMM.gguf`).
pub fn is_split_shard(name: &str) -> bool {
    split_stem(name).is_some()
}

/// A file named explicitly, or, when its name is a split shard's, every shard of its set in the
/// listing (llama.cpp fetches the whole set too).
pub fn with_split_siblings(repo: &str, files: &[String], file: &str) -> Result<Vec<String>> {
    let (Some(stem), Some(count)) = (split_stem(file), split_count(file)) else {
        return Ok(vec![file.to_string()]);
    };
    let members: Vec<String> = files
        .iter()
        .filter(|f| split_stem(f) == Some(stem) && split_count(f) == Some(count))
        .cloned()
        .collect();
    complete_set(repo, members)
}

/// The quantizations a repository listing holds as GGUF files (`BF16`, `IQ1_S`, `Q4_K_M`, …,
/// from the file names; projectors skipped), sorted, each once.
pub fn quantizations(files: &[String]) -> Vec<String> {
    let mut available: Vec<String> = files
        .iter()
        .filter(|f| is_model_gguf(f))
        .filter_map(|f| quant_token(f))
        .collect();
    available.sort();
    available.dedup();
    available
}

/// Whether `quant` appears in `path` as a whole token: preceded by the start, `-`, `.`, `_` or
/// `/`, followed by the end, `-`, `.` or `/` (case-insensitive).
fn has_token(path: &str, quant: &str) -> bool {
    let (p, q) = (path.to_ascii_lowercase(), quant.to_ascii_lowercase());
    if q.is_empty() {
        return false;
    }
    p.match_indices(&q).any(|(i, _)| {
        let before = p[..i].chars().next_back();
        let after = p[i + q.len()..].chars().next();
        matches!(before, None | Some('-' | '.' | '/'))
            && matches!(after, None | Some('-' | '.' | '/'))
    })
}

/// `name` without its `-NNNNN-of-MMMMM.gguf` split suffix, if it has one.
fn split_stem(name: &str) -> Option<&str> {
    let stem = strip_gguf(name)?;
    let (rest, of) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(no) && digits(of)).then_some(prefix)
}

/// `name` without a `.gguf` extension in any case.
fn strip_gguf(name: &str) -> Option<&str> {
    let cut = name.len().checked_sub(5)?;
    (name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(".gguf")).then(|| &name[..cut])
}

/// The `MMMMM` of a split shard's name.
fn split_count(name: &str) -> Option<usize> {
    split_stem(name)?;
    strip_gguf(name)?.rsplit_once("-of-")?.1.parse().ok()
}

/// The `NNNNN` (1-based) of a split shard's name.
fn split_number(name: &str) -> Option<usize> {
    let stem = split_stem(name)?;
    let rest = &strip_gguf(name)?[stem.len() + 1..];
    rest.split_once("-of-")?.0.parse().ok()
}

/// The quantization a GGUF file name carries: the last `-`/`.`-separated token of its stem (or
/// of its directory) that looks like one (F16, BF16, F32, Q…, IQ…, MXFP4, TQ…).
fn quant_token(path: &str) -> Option<String> {
    let stem = strip_gguf(path)?;
    let stem = split_stem(path).unwrap_or(stem);
    stem.rsplit(['-', '.', '/'])
        .find(|t| {
            let u = t.to_ascii_uppercase();
            matches!(u.as_str(), "F16" | "BF16" | "F32" | "MXFP4")
                || ((u.starts_with('Q') || u.starts_with("IQ") || u.starts_with("TQ"))
                    && u.chars()
                        .nth(if u.starts_with('Q') { 1 } else { 2 })
                        .is_some_and(|c| c.is_ascii_digit()))
        })
        .map(|t| t.to_ascii_uppercase())
}

/// `hf:org/repo[:file]` → (repo, file).
pub fn parse_reference(reference: &str) -> Option<(String, Option<String>)> {
    let rest = reference.strip_prefix("hf:")?;
    let (repo, file) = match rest.split_once(':') {
        Some((r, f)) => (r, Some(f.to_string())),
        None => (rest, None),
    };
    (repo.split('/').count() == 2 && !repo.starts_with('/') && !repo.ends_with('/'))
        .then(|| (repo.to_string(), file))
}

/// A local stand-in for the hub endpoints this client uses, for tests and offline mirrors.
#[doc(hidden)]
pub mod mock {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::sha256_file;

    /// Serve the files of `root` on 127.0.0.1 for `requests` connections, at
    /// `/{org}/{repo}/resolve/main/{file}`, with Range support and SHA-256 ETags (wrong ones with
    /// `wrong_etag`). Returns the endpoint URL.
    pub fn serve(root: PathBuf, wrong_etag: bool, requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let root = Arc::new(root);
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
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map_or(true, |n| n == 0) || h.trim().is_empty() {
                        break;
                    }
                    let spec = h.to_ascii_lowercase();
                    if let Some((a, b)) = spec
                        .strip_prefix("range: bytes=")
                        .and_then(|v| v.trim().split_once('-'))
                    {
                        range = a.parse::<u64>().ok().map(|a| (a, b.parse::<u64>().ok()));
                    }
                }
                // /api/models/org/repo: every file under root as a sibling.
                if path.starts_with("/api/models/") {
                    let mut files = Vec::new();
                    list(&root, &root, &mut files);
                    let siblings: Vec<_> = files
                        .iter()
                        .map(|f| serde_json::json!({ "rfilename": f }))
                        .collect();
                    let body = serde_json::json!({ "siblings": siblings }).to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body.as_bytes());
                    continue;
                }
                // /org/repo/resolve/main/file
                let file = path.splitn(6, '/').nth(5).unwrap_or("");
                let full = root.join(file);
                let Ok(bytes) = std::fs::read(&full) else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
                let etag = if wrong_etag {
                    "0".repeat(64)
                } else {
                    sha256_file(&full).unwrap_or_default()
                };
                let total = bytes.len() as u64;
                let (status, body, extra) = match range {
                    Some((a, b)) => {
                        let end = b.map_or(total, |b| (b + 1).min(total));
                        let a = a.min(end);
                        (
                            206,
                            &bytes[a as usize..end as usize],
                            format!("Content-Range: bytes {a}-{}/{total}\r\n", end - 1),
                        )
                    }
                    None => (200, &bytes[..], String::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status} OK\r\nContent-Length: {}\r\nX-Linked-ETag: \"{etag}\"\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        format!("http://{addr}")
    }

    /// Paths of the files under `dir`, relative to `root`, with `/` separators.
    fn list(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                list(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                let parts: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                out.push(parts.join("/"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pick_quantization;

    fn listing() -> Vec<String> {
        [
            ".gitattributes",
            "README.md",
            "BF16/Llama-4-Scout-17B-16E-Instruct-BF16-00001-of-00005.gguf",
            "Q4_K_M/Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00002-of-00002.gguf",
            "Q4_K_M/Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00001-of-00002.gguf",
            "Llama-4-Scout-17B-16E-Instruct-UD-IQ1_S.gguf",
            "Llama-4-Scout-17B-16E-Instruct-UD-Q4_K_XL.gguf",
            "Llama-4-Scout-17B-16E-Instruct-Q4_K.gguf",
            "mmproj-F16.gguf",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn urls_encode_each_path_segment() {
        let hub = super::Hub::new("http://h", None);
        assert_eq!(
            hub.url("org/repo", "Q4 K/a#b?c%d-é.gguf"),
            "http://h/org/repo/resolve/main/Q4%20K/a%23b%3Fc%25d-%C3%A9.gguf"
        );
        assert_eq!(
            hub.url("org/repo", "Q4_K_M/m-00001-of-00002.gguf"),
            "http://h/org/repo/resolve/main/Q4_K_M/m-00001-of-00002.gguf"
        );
    }

    /// Names as repositories publish them: split sets in directories, `UD-` prefixes, `Q4_K`
    /// beside `Q4_K_M` and `Q4_K_XL`, a projector that is never picked.
    #[test]
    fn quantization_names_pick_one_file_or_one_whole_set() {
        let pick = |q: &str| pick_quantization("org/scout", &listing(), q);
        assert_eq!(
            pick("q4_k_m").unwrap(),
            [
                "Q4_K_M/Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00001-of-00002.gguf",
                "Q4_K_M/Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00002-of-00002.gguf"
            ]
        );
        assert_eq!(
            pick("IQ1_S").unwrap(),
            ["Llama-4-Scout-17B-16E-Instruct-UD-IQ1_S.gguf"]
        );
        assert_eq!(
            pick("Q4_K").unwrap(),
            ["Llama-4-Scout-17B-16E-Instruct-Q4_K.gguf"]
        );
        let err = pick("Q8_0").unwrap_err().to_string();
        assert!(
            err.ends_with("the repository has BF16, IQ1_S, Q4_K, Q4_K_M, Q4_K_XL"),
            "{err}"
        );
        // `_` does not start a token: `K_M` is not a quantization of this repository.
        assert!(pick("K_M").is_err());
        // A shard named explicitly brings its whole set.
        let named = "Q4_K_M/Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00002-of-00002.gguf";
        assert_eq!(
            super::with_split_siblings("org/scout", &listing(), named).unwrap(),
            pick("Q4_K_M").unwrap()
        );
        // Shards of different counts are not one set.
        let odd = ["a-Q8_0-00001-of-00002.gguf", "a-Q8_0-00002-of-00003.gguf"].map(String::from);
        assert!(pick_quantization("o/r", &odd, "Q8_0").is_err());
        // One shard of five listed: an incomplete set is an error, not a partial download.
        let err = pick("BF16").unwrap_err().to_string();
        assert!(err.contains("lists 1 of its 5 files"), "{err}");
    }
}
