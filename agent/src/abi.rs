//! How domain values are written in the kernel ABI (`knhk_abi` numbers). The policy compiler and
//! the datapath are the only modules that use it (the layer check in `xtask` enforces that);
//! everything above them speaks [`crate::model`] types.

use crate::model::{Action, Class, ClassState, LatencySource, Protocol};

/// `knhk_abi::CLASS_*` of a class.
pub fn class(c: Class) -> u8 {
    match c {
        Class::R1 => knhk_abi::CLASS_R1,
        Class::W1 => knhk_abi::CLASS_W1,
        Class::C1 => knhk_abi::CLASS_C1,
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
