//! `herd quantize` writes what llama.cpp's tools write: the same tensor types and bytes as
//! `llama-quantize` (GGUF in) and as `convert_hf_to_gguf.py` (HF directory in).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use herd_formats::GgufFile;
use herd_formats::gguf::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llama4_gguf")
        .join(name)
}

fn quantize(input: &Path, ty: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("quantize")
        .arg(input)
        .arg(&out)
        .args(["--type", ty])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (tmp, out)
}

/// Tensors by name: (type, dims, bytes).
fn tensors(f: &GgufFile) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    f.tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                (
                    t.dtype.name().to_string(),
                    t.dims.clone(),
                    f.tensor_bytes(t).as_slice().to_vec(),
                ),
            )
        })
        .collect()
}

fn assert_same_tensors(ours: &GgufFile, theirs: &GgufFile) {
    let (a, b) = (tensors(ours), tensors(theirs));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    for (name, (ty, dims, bytes)) in &a {
        let (tty, tdims, tbytes) = &b[name];
        assert_eq!((ty, dims), (tty, tdims), "{name}: type and shape");
        assert!(bytes == tbytes, "{name}: {ty} bytes differ");
    }
}

/// Every key we write that llama.cpp's file also has carries the same value; the keys llama.cpp
/// needs to load the model are all there.
fn assert_same_metadata(ours: &GgufFile, theirs: &GgufFile, ignore: &[&str]) {
    for (k, v) in &ours.header.metadata {
        if ignore.contains(&k.as_str()) {
            continue;
        }
        let want = theirs
            .get(k)
            .unwrap_or_else(|| panic!("we write {k}, llama.cpp does not"));
        let close = match (v, want) {
            (Value::F32(a), Value::F32(b)) => a == b,
            _ => v == want,
        };
        assert!(close, "{k}: {v:?} vs llama.cpp {want:?}");
    }
    for (k, _) in &theirs.header.metadata {
        let needed =
            k.starts_with("llama4.") || k.starts_with("tokenizer.") || k == "general.architecture";
        if needed && !ignore.contains(&k.as_str()) {
            assert!(ours.get(k).is_some(), "llama.cpp writes {k}, we do not");
        }
    }
}

#[test]
fn gguf_to_q4_k_m_equals_llama_quantize() {
    let (_tmp, out) = quantize(&fixture("tiny-f32.gguf"), "q4_k_m");
    let ours = GgufFile::open(&out).unwrap();
    let theirs = GgufFile::open(&fixture("tiny-q4_k_m.llama-quantize.gguf")).unwrap();
    assert_same_tensors(&ours, &theirs);
    assert_same_metadata(&ours, &theirs, &[]);
}

#[test]
fn hf_directory_to_q8_0_and_f32_equals_the_converter() {
    for (ty, file) in [("q8_0", "tiny-q8_0.gguf"), ("f32", "tiny-f32.gguf")] {
        let (_tmp, out) = quantize(&fixture(""), ty);
        let ours = GgufFile::open(&out).unwrap();
        let theirs = GgufFile::open(&fixture(file)).unwrap();
        assert_same_tensors(&ours, &theirs);
        // The converter names the model after its directory and sizes it; those are labels.
        assert_same_metadata(&ours, &theirs, &["general.name", "general.size_label"]);
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.gguf");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_herd"))
            .arg("quantize")
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let f32 = fixture("tiny-f32.gguf");
    let (code, err) = run(&[
        f32.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q3_xyz",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown --type") && err.contains("q4_k_m"),
        "{err}"
    );
    let (code, err) = run(&["/nonexistent.gguf", out.to_str().unwrap(), "--type", "q8_0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nonexistent"), "{err}");
    assert!(!out.exists() && !out.with_extension("gguf.partial").exists());
}

/// `--split-max-tensors` and `--split-max-size` write split sets as llama-gguf-split does: files
/// `OUTPUT-0000k-of-0000N.gguf` holding the unsplit output's tensors (same bytes), the metadata
/// in the first, the split keys in each. A split input quantizes like the unsplit file, its
/// split keys not carried over. Bad limits are clear errors.
#[test]
fn split_outputs_and_split_inputs() {
    let (_whole_dir, whole) = quantize(&fixture("tiny-f32.gguf"), "q8_0");
    let want = tensors(&GgufFile::open(&whole).unwrap());
    let herd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(args)
            .output()
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let (input, out_s) = (fixture("tiny-f32.gguf"), out.to_str().unwrap().to_string());
    for (flag, value, files) in [
        ("--split-max-tensors", "20", 3),
        ("--split-max-size", "1M", 1),
    ] {
        let o = herd(&[
            "quantize",
            input.to_str().unwrap(),
            &out_s,
            "--type",
            "q8_0",
            flag,
            value,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let shards: Vec<PathBuf> = (1..=files)
            .map(|i| tmp.path().join(format!("m-{i:05}-of-{files:05}.gguf")))
            .collect();
        for (i, s) in shards.iter().enumerate() {
            let f = GgufFile::open(s).unwrap();
            assert_eq!(
                tensors(&f),
                want,
                "{flag} {value}: opened from file {}",
                i + 1
            );
            assert_eq!(f.get("split.count"), Some(&Value::U16(files as u16)));
            assert_eq!(
                f.get("split.tensors.count"),
                Some(&Value::I32(want.len() as i32))
            );
            // Each file's own header: its position, and the model's keys in the first only.
            let own = herd_formats::gguf::parse_header(&std::fs::read(s).unwrap()).unwrap();
            let key = |k: &str| {
                own.metadata
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(key("split.no"), Some(Value::U16(i as u16)));
            assert_eq!(key("general.architecture").is_some(), i == 0);
            if files == 3 {
                // 48 tensors, 20 per file.
                assert_eq!(own.tensors.len(), [20, 20, 8][i]);
            }
        }
    }
    // A split input: the same output as the unsplit input, no split keys in it.
    let from_split = tmp.path().join("from-split.gguf");
    let shard = fixture("split/tiny-q4_k_m-00002-of-00004.gguf");
    let o = herd(&[
        "quantize",
        shard.to_str().unwrap(),
        from_split.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_d, from_whole) = quantize(&fixture("tiny-q4_k_m.llama-quantize.gguf"), "q8_0");
    let a = GgufFile::open(&from_split).unwrap();
    assert_eq!(tensors(&a), tensors(&GgufFile::open(&from_whole).unwrap()));
    assert!(a.get("split.count").is_none() && a.shard_paths().len() == 1);
    // A split output whose files would replace the split input's.
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=4 {
        let name = format!("tiny-q4_k_m-{i:05}-of-00004.gguf");
        std::fs::copy(fixture("split").join(&name), dir.path().join(&name)).unwrap();
    }
    let own = dir.path().join("tiny-q4_k_m-00001-of-00004.gguf");
    let o = herd(&[
        "quantize",
        own.to_str().unwrap(),
        dir.path().join("tiny-q4_k_m.gguf").to_str().unwrap(),
        "--type",
        "q8_0",
        "--split-max-tensors",
        "12",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("could overwrite the input"),
        "{err}"
    );
    for (flag, value, says) in [
        ("--split-max-size", "1é", "followed by M or G"),
        ("--split-max-size", "48X", "followed by M or G"),
        ("--split-max-size", "0G", "positive number"),
        ("--split-max-tensors", "0", "at least 1"),
    ] {
        let o = herd(&[
            "quantize",
            input.to_str().unwrap(),
            &out_s,
            "--type",
            "q8_0",
            flag,
            value,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

/// `herd` with `args`, its output.
fn herd(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .output()
        .unwrap()
}

/// The f32 Llama 4 of tests/fixtures/llama4_iq (rows of 256; `herd random-model … --seed 11`,
/// the model llama.cpp quantized there), written into `dir`.
fn iq_fixture_f32(dir: &Path) -> PathBuf {
    let f32_file = dir.join("f32.gguf");
    let config = fixture("../llama4_iq/config.json");
    let o = herd(&[
        "random-model".as_ref(),
        config.as_os_str(),
        f32_file.as_os_str(),
        "--type".as_ref(),
        "f32".as_ref(),
        "--seed".as_ref(),
        "11".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    f32_file
}

/// A legacy `.dat` importance matrix holding `entries` (name, values), as llama-imatrix writes
/// it (`herd_formats::imatrix` module docs).
fn write_dat(path: &Path, entries: &[(&str, Vec<f32>)]) {
    let mut b = Vec::new();
    b.extend((entries.len() as i32).to_le_bytes());
    for (name, values) in entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend((values.len() as i32).to_le_bytes());
        for v in values {
            b.extend(v.to_le_bytes());
        }
    }
    std::fs::write(path, b).unwrap();
}

/// As llama-quantize does, `herd quantize` refuses the very low-bit file types without an
/// importance matrix, and with one that lacks a tensor they would quantize to such a type,
/// before any work, naming the type and the tensor; `--quantize` at load (where there is no
/// matrix) refuses them, and MXFP4_MOE (3-D experts only in files).
#[test]
fn types_that_need_an_importance_matrix_are_refused_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    // Rows of 256, so IQ2_XXS does not fall back to IQ4_NL.
    let f32_file = iq_fixture_f32(tmp.path());
    let out = tmp.path().join("out.gguf");
    let quantize = |ty: &str, imatrix: Option<&Path>| {
        let mut args = vec![
            "quantize".as_ref(),
            f32_file.as_os_str(),
            out.as_os_str(),
            "--type".as_ref(),
            ty.as_ref(),
        ];
        if let Some(m) = imatrix {
            args.extend(["--imatrix".as_ref(), m.as_os_str()]);
        }
        let o = herd(&args);
        assert!(!o.status.success() && !out.exists(), "{ty}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for ty in ["iq2_xxs", "iq1_s", "iq3_xxs"] {
        let err = quantize(ty, None);
        assert!(
            err.contains(ty) && err.contains("needs an importance matrix"),
            "{err}"
        );
    }
    let partial = tmp.path().join("partial.dat");
    write_dat(&partial, &[("blk.0.attn_q.weight", vec![1.0; 256])]);
    let err = quantize("iq2_xxs", Some(&partial));
    assert!(
        err.contains("no entry for blk.0.attn_k.weight") && err.contains("IQ2_XXS"),
        "{err}"
    );
    let tiny = fixture("tiny-f32.gguf");
    for ty in ["mxfp4_moe", "iq2_xxs", "iq3_xxs"] {
        let mut args: Vec<&std::ffi::OsStr> = ["bench", "-p", "8", "-n", "0", "-b", "0"]
            .iter()
            .map(|a| a.as_ref())
            .collect();
        args.extend(["--quantize".as_ref(), ty.as_ref(), tiny.as_os_str()]);
        let o = herd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(ty), "{err}");
    }
}

/// `herd quantize --imatrix … --type iq2_xxs` writes llama-quantize's `--imatrix … IQ2_XXS`
/// file of the same f32 model (tests/fixtures/llama4_iq) tensor for tensor, byte for byte:
/// its IQ2_XXS tensors, its Q2_K `attn_v` (both quantized from the matrix) and its Q2_K token
/// embedding and Q5_K output (the matrix has no entry for them).
#[test]
fn iq2_xxs_with_an_importance_matrix_equals_llama_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_file = iq_fixture_f32(tmp.path());
    let theirs = GgufFile::open(&fixture("../llama4_iq/iq2_xxs.gguf")).unwrap();
    for imatrix in ["imatrix.gguf", "imatrix.dat"] {
        let out = tmp.path().join(format!("{imatrix}.iq2_xxs.gguf"));
        let m = fixture(&format!("../llama4_iq/{imatrix}"));
        let o = herd(&[
            "quantize".as_ref(),
            f32_file.as_os_str(),
            out.as_os_str(),
            "--type".as_ref(),
            "iq2_xxs".as_ref(),
            "--imatrix".as_ref(),
            m.as_os_str(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_same_tensors(&GgufFile::open(&out).unwrap(), &theirs);
    }
}

/// llama-quantize's type overrides: `herd quantize --imatrix … --type q4_k_m --tensor-type
/// ffn_*_exps=iq2_xxs … --output-tensor-type q6_k --split-max-tensors 20` writes the mixed split
/// set of tests/fixtures/llama4_iq (llama-quantize with the same flags, then
/// llama-gguf-split --split-max-tensors 20) shard for shard, tensor for tensor, byte for byte:
/// the overridden experts, and the rules' choices for the rest, which skip the overridden
/// tensors in their counts as llama.cpp does (attn_v and ffn_down get Q6_K by their count).
#[test]
fn mixed_types_with_overrides_equal_llama_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_file = iq_fixture_f32(tmp.path());
    let m = fixture("../llama4_iq/imatrix.gguf");
    let out = tmp.path().join("mixed");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "quantize".as_ref(),
        f32_file.as_os_str(),
        out.as_os_str(),
        "--type".as_ref(),
        "q4_k_m".as_ref(),
        "--imatrix".as_ref(),
        m.as_os_str(),
        "--output-tensor-type".as_ref(),
        "q6_k".as_ref(),
        "--split-max-tensors".as_ref(),
        "20".as_ref(),
    ];
    let experts = ["gate", "up", "down"].map(|kind| format!("ffn_{kind}_exps=iq2_xxs"));
    for e in &experts {
        args.extend::<[&std::ffi::OsStr; 2]>(["--tensor-type".as_ref(), e.as_ref()]);
    }
    let o = herd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shard_tensors = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let f = GgufFile::from_prefix("shard", &bytes, bytes.len() as u64).unwrap();
        f.tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
    };
    for i in 1..=3 {
        let name = format!("mixed-0000{i}-of-00003.gguf");
        let (ours, theirs) = (
            tmp.path().join(&name),
            fixture(&format!("../llama4_iq/{name}")),
        );
        assert_eq!(shard_tensors(&ours), shard_tensors(&theirs), "{name}");
    }
    let first = "mixed-00001-of-00003.gguf";
    assert_same_tensors(
        &GgufFile::open(&tmp.path().join(first)).unwrap(),
        &GgufFile::open(&fixture(&format!("../llama4_iq/{first}"))).unwrap(),
    );
    // Bad overrides are clear errors.
    let bad = tmp.path().join("bad.gguf");
    for (flag, value, want) in [
        ("--tensor-type", "ffn_up", "expected PATTERN=TYPE"),
        ("--tensor-type", "ffn_(up=q4_k", "not a regular expression"),
        ("--tensor-type", "ffn_up=q9_k", "not a tensor type"),
        ("--output-tensor-type", "q8_k", "not a tensor type"),
    ] {
        let o = herd(&[
            "quantize".as_ref(),
            f32_file.as_os_str(),
            bad.as_os_str(),
            "--type".as_ref(),
            "q4_k_m".as_ref(),
            flag.as_ref(),
            value.as_ref(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{flag} {value}: {err}"
        );
    }
}

/// `herd quantize --imatrix` with llama-imatrix's matrix, in its GGUF and its legacy `.dat`
/// form, writes llama-quantize's `--imatrix … IQ4_XS` file of the same f32 model
/// (tests/fixtures/llama4_iq, made by gen_llama4_iq.py from `herd random-model … --seed 11`)
/// tensor for tensor, byte for byte.
#[test]
fn iq4_xs_with_an_importance_matrix_equals_llama_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_file = iq_fixture_f32(tmp.path());
    let theirs = GgufFile::open(&fixture("../llama4_iq/iq4_xs.gguf")).unwrap();
    let quantize_iq4_xs = |out: &Path, imatrix: Option<PathBuf>| {
        let mut args = vec![
            "quantize".as_ref(),
            f32_file.as_os_str(),
            out.as_os_str(),
            "--type".as_ref(),
            "iq4_xs".as_ref(),
        ];
        if let Some(m) = &imatrix {
            args.extend(["--imatrix".as_ref(), m.as_os_str()]);
        }
        let o = herd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        GgufFile::open(out).unwrap()
    };
    for imatrix in ["imatrix.gguf", "imatrix.dat"] {
        let out = tmp.path().join(format!("{imatrix}.iq4_xs.gguf"));
        let ours = quantize_iq4_xs(&out, Some(fixture(&format!("../llama4_iq/{imatrix}"))));
        assert_same_tensors(&ours, &theirs);
    }
    // Without the matrix the bytes differ: the matrix is what made them equal.
    let plain = quantize_iq4_xs(&tmp.path().join("plain.gguf"), None);
    let t = plain.tensor_info("blk.0.attn_q.weight").unwrap();
    let u = theirs.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_ne!(
        plain.tensor_bytes(t).as_slice(),
        theirs.tensor_bytes(u).as_slice()
    );
}
