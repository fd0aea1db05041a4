//! How domain values are written in the kernel ABI (`knhk_abi` numbers). The policy compiler and
//! the datapath are the only modules that use it (the layer check in `xtask` enforces that);
//! everything above them speaks [`crate::model`] types.

use crate::model::{Action, Class, ClassState, LatencySource, Protocol, Side};

/// `knhk_abi::CLASS_*` of a class.
pub fn class(c: Class) -> u8 {
    match c {
        Class::R1 => knhk_abi::CLASS_R1,
        Class::W1 => knhk_abi::CLASS_W1,
        Class::C1 => knhk_abi::CLASS_C1,
    }
}

/// `knhk_abi::SIDE_*` of a rollout side.
pub fn side(s: Side) -> u8 {
    match s {
        Side::Stable => knhk_abi::SIDE_STABLE,
        Side::Candidate => knhk_abi::SIDE_CANDIDATE,
    }
}

/// `knhk_abi::PROTO_*` of a protocol.
pub fn protocol(p: Protocol) -> u8 {
    match p {
        Protocol::Any => knhk_abi::PROTO_ANY,
        Protocol::Tcp => knhk_abi::PROTO_TCP,
        Protocol::Udp => knhk_abi::PROTO_UDP,
    }
}

/// `knhk_abi::ACTION_*` of a rule action.
pub fn action(a: Action) -> u8 {
    match a {
        Action::Allow => knhk_abi::ACTION_ALLOW,
        Action::Deny => knhk_abi::ACTION_DENY,
        Action::Audit => knhk_abi::ACTION_AUDIT,
    }
}

/// `knhk_abi::STATE_*` of a class state.
pub fn class_state(s: ClassState) -> u32 {
    match s {
        ClassState::Normal => knhk_abi::STATE_NORMAL,
        ClassState::Degraded => knhk_abi::STATE_DEGRADED,
        ClassState::Paused => knhk_abi::STATE_PAUSED,
    }
}

/// `knhk_abi::LATENCY_*`: the kernel histogram kind of a latency source.
pub fn latency_kind(s: LatencySource) -> usize {
    match s {
        LatencySource::Handshake => knhk_abi::LATENCY_HANDSHAKE,
        LatencySource::Rtt => knhk_abi::LATENCY_RTT,
    }
}

/// The name of a decision's `knhk_abi::ACTION_*` as the API and logs write it.
pub fn decision_name(action: u8) -> &'static str {
    match action {
        knhk_abi::ACTION_ALLOW => "allow",
        knhk_abi::ACTION_DENY => "deny",
        knhk_abi::ACTION_AUDIT => "audit",
        knhk_abi::ACTION_SHED => "shed",
        knhk_abi::ACTION_PARK => "park",
        _ => "unknown",
    }
}

/// The class of a `knhk_abi::CLASS_*` number (the kernel treats unknown numbers as C1).
pub fn class_of(c: u8) -> Class {
    match c {
        knhk_abi::CLASS_R1 => Class::R1,
        knhk_abi::CLASS_W1 => Class::W1,
        _ => Class::C1,
    }
}

/// The name of a `knhk_abi::HOOK_*`.
pub fn hook_name(hook: u8) -> &'static str {
    match hook {
        knhk_abi::HOOK_CONNECT4 => "connect4",
        knhk_abi::HOOK_CONNECT6 => "connect6",
        knhk_abi::HOOK_SENDMSG4 => "sendmsg4",
        knhk_abi::HOOK_SENDMSG6 => "sendmsg6",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_numbers_are_their_domain_index() {
        // Per-class arrays are indexed by `Class::index()` on both sides of the ABI.
        for c in Class::ALL {
            assert_eq!(class(c) as usize, c.index());
        }
    }
}
