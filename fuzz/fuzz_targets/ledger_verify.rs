//! `knhk-agent receipts verify --db FILE --trusted-key KEY` on a mutated ledger: the seed is a
//! small ledger signed by the fuzzers' test key (30 receipts, two checkpoints), the input the
//! bytes of the file, written to a private temporary file and verified as the CLI does it.
//!
//! Properties: the verification returns a report or an error and never panics out of
//! `verify_file_with` (redb's own asserts on damaged files are caught there by design; any other
//! panic aborts the run, see the hook below); and a mutated ledger that still verifies against
//! the pinned key holds exactly the receipts the key signed: the same report, receipt count and
//! anchored size as the seed, or fewer receipts (a damaged table can lose entries; it cannot
//! forge them).
#![no_main]

use knhk_agent::receipts::{format::fingerprint, verify::verify_file_with};
use libfuzzer_sys::fuzz_target;
use std::{io::Write, sync::OnceLock};

struct Fixture {
    file: tempfile::NamedTempFile,
    trusted: Vec<String>,
}

fn fixture() -> &'static std::sync::Mutex<Fixture> {
    static FIXTURE: OnceLock<std::sync::Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // redb asserts on some damaged files; verify_file_with catches that by design. Other
        // panics (the agent's own code) must still abort the run as libFuzzer's hook does.
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_redb = info.location().is_some_and(|l| l.file().contains("/redb-"));
            if !in_redb {
                fuzzer_hook(info);
            }
        }));
        // tmpfs when there is one: each run writes the whole file.
        let dir = std::path::Path::new("/dev/shm");
        let file = if dir.is_dir() {
            tempfile::NamedTempFile::new_in(dir)
        } else {
            tempfile::NamedTempFile::new()
        }
        .expect("a temporary file");
        std::sync::Mutex::new(Fixture {
            file,
            trusted: vec![fingerprint(&knhk_fuzz::test_public_der())],
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let path = fixture.file.path();
    {
        let mut f = std::fs::File::create(path).expect("temporary file");
        f.write_all(data).expect("write");
    }
    let Ok(report) = verify_file_with(path, &fixture.trusted) else {
        return;
    };
    if report.ok() {
        // The seed: 30 receipts under two checkpoints signed by the pinned key.
        assert!(
            report.receipts <= 30,
            "a mutated ledger verified with {} receipts: {report:?}",
            report.receipts
        );
        assert!(
            report.trust.anchored_size.unwrap_or(0) <= 30,
            "a mutated ledger verified anchored beyond what the key signed: {report:?}"
        );
        for k in &report.key_history {
            assert_eq!(
                k.fingerprint, fixture.trusted[0],
                "a key other than the pinned one verified: {report:?}"
            );
        }
    }
});
