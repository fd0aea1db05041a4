//! A policy document as `ApplyPolicy` receives it: protobuf bytes decoded with prost, converted
//! by `policy_from_proto` (the API's validation) and compiled as the datapath would compile it
//! before writing the kernel's tables. Errors are answers; a panic is a bug. A document the API
//! accepts round-trips through its proto encoding.
#![no_main]

use knhk_agent::{
    api::{convert::policy_from_proto, pb::PolicyDocument},
    config::Config,
    policy::Policy,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

/// The most rules a fuzzed document may carry (the agent's default limit is 100,000; a smaller
/// one keeps each run short without changing what is checked).
const MAX_RULES: usize = 1_000;

fn defaults() -> &'static Policy {
    static DEFAULTS: OnceLock<Policy> = OnceLock::new();
    DEFAULTS.get_or_init(|| Config::embedded_default().policy())
}

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = PolicyDocument::decode(data) else {
        return;
    };
    let Ok(policy) = policy_from_proto(Some(&doc), defaults(), MAX_RULES) else {
        return;
    };
    // Whether it compiles depends on kernel limits; either answer is fine, a panic is not.
    let _ = knhk_fuzz::compile(&policy);
    knhk_fuzz::assert_proto_round_trip(&policy, defaults(), MAX_RULES);
});
