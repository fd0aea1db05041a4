//! What a receipt records: the kinds of decisions the ledger keeps.

/// What a receipt records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiptKind {
    /// A policy generation was switched in.
    PolicySwitch,
    /// A runtime class changed state (normal, degraded, paused).
    ClassState,
    /// The summary of an 8-beat cycle, at its pulse.
    CycleSummary,
    /// The signing key was rotated.
    KeyRotation,
    /// A legal hold was placed.
    HoldPlaced,
    /// A legal hold was released.
    HoldReleased,
    /// A rollout event: start, step (with the gate's figures), hold, pause, resume, promote,
    /// rollback (with the failed gate's figures), abort.
    Rollout,
    /// A fleet bundle was applied or refused.
    Bundle,
}

impl ReceiptKind {
    /// Every kind.
    pub const ALL: [ReceiptKind; 8] = [
        ReceiptKind::PolicySwitch,
        ReceiptKind::ClassState,
        ReceiptKind::CycleSummary,
        ReceiptKind::KeyRotation,
        ReceiptKind::HoldPlaced,
        ReceiptKind::HoldReleased,
        ReceiptKind::Rollout,
        ReceiptKind::Bundle,
    ];

    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            ReceiptKind::PolicySwitch => 1,
            ReceiptKind::ClassState => 2,
            ReceiptKind::CycleSummary => 3,
            ReceiptKind::KeyRotation => 4,
            ReceiptKind::HoldPlaced => 5,
            ReceiptKind::HoldReleased => 6,
            ReceiptKind::Rollout => 7,
            ReceiptKind::Bundle => 8,
        }
    }

    /// The kind of a wire code.
    pub fn from_code(code: u8) -> Option<ReceiptKind> {
        ReceiptKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name used in configuration, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptKind::PolicySwitch => "policy_switch",
            ReceiptKind::ClassState => "class_state",
            ReceiptKind::CycleSummary => "cycle_summary",
            ReceiptKind::KeyRotation => "key_rotation",
            ReceiptKind::HoldPlaced => "hold_placed",
            ReceiptKind::HoldReleased => "hold_released",
            ReceiptKind::Rollout => "rollout",
            ReceiptKind::Bundle => "bundle",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<ReceiptKind> {
        ReceiptKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}
