//! `Config::parse` on arbitrary text: an error or a configuration, never a panic. A configuration
//! that parses has a policy that compiles (check-config promises the agent will start with it),
//! survives the gRPC encoding (when it has rules: the API refuses an empty document), and whose `to_config_toml` (what `policy get --output toml`
//! prints) parses back to the same rules.
#![no_main]

use knhk_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    let policy = config.policy();
    assert!(
        knhk_fuzz::compile(&policy),
        "a config that parses has a policy that does not compile"
    );
    // The API refuses a document without rules (a config may have none: everything defaults).
    if !policy.rules.is_empty() {
        knhk_fuzz::assert_proto_round_trip(&policy, &policy, policy.rules.len());
    }
    let toml = policy.to_config_toml();
    match Config::parse(&toml, "round-trip.toml") {
        Ok(back) => assert_eq!(
            back.policy().rules,
            policy.rules,
            "to_config_toml does not parse back to the same rules:\n{toml}"
        ),
        Err(e) => panic!("to_config_toml's output is refused: {e}\n{toml}"),
    }
});
