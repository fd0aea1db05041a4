//! The brownout ladder: per-beat class states from SLO breaches. Pure; exhaustively tested.
//!
//! When a class breaches its SLO, colder classes give way first: C1, then W1, one step per beat.
//! A shed class is `Paused` (its new connects are refused) under the Strict strategy and
//! `Degraded` (parked) under Degrade. When every colder class is shed and the breach persists,
//! the breaching class itself is shed too — except R1 under Degrade: R1 is never parked; its
//! breach stays visible in the metrics. After `recover_beats` consecutive beats without a breach,
//! the hottest shed class returns to `Normal`, one class per `recover_beats` beats.

use crate::model::{AdmissionStrategy, Class, ClassState};

/// The ladder's state: one state per class (R1, W1, C1) and the healthy-beat streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ladder {
    /// States in class order R1, W1, C1.
    pub states: [ClassState; 3],
    /// Consecutive beats without a breach.
    pub healthy_beats: u32,
}

impl Default for Ladder {
    fn default() -> Self {
        Ladder {
            states: [ClassState::Normal; 3],
            healthy_beats: 0,
        }
    }
}

/// A state change made by one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The class.
    pub class: Class,
    /// Before.
    pub from: ClassState,
    /// After.
    pub to: ClassState,
}

impl Ladder {
    /// The state of `class`.
    pub fn state(&self, class: Class) -> ClassState {
        self.states[class.index()]
    }

    /// One beat: `breach[i]` says whether class i (R1, W1, C1) is over its SLO in the window.
    /// Changes at most one class.
    pub fn step(
        &mut self,
        breach: [bool; 3],
        strategy: AdmissionStrategy,
        recover_beats: u32,
    ) -> Option<Change> {
        let shed = match strategy {
            AdmissionStrategy::Strict => ClassState::Paused,
            AdmissionStrategy::Degrade => ClassState::Degraded,
        };
        match breach.iter().position(|b| *b) {
            Some(hot) => {
                self.healthy_beats = 0;
                // Colder classes first (C1, then W1), then the breaching class itself.
                let candidates = (hot + 1..3).rev().chain(std::iter::once(hot));
                for i in candidates {
                    if i == 0 && strategy == AdmissionStrategy::Degrade {
                        continue; // R1 is never parked.
                    }
                    if self.states[i] == ClassState::Normal {
                        return Some(self.set(i, shed));
                    }
                }
                None
            }
            None => {
                self.healthy_beats = self.healthy_beats.saturating_add(1);
                if self.healthy_beats < recover_beats.max(1) {
                    return None;
                }
                // The hottest shed class recovers first.
                let i = self.states.iter().position(|s| *s != ClassState::Normal)?;
                self.healthy_beats = 0;
                Some(self.set(i, ClassState::Normal))
            }
        }
    }

    fn set(&mut self, i: usize, to: ClassState) -> Change {
        let from = self.states[i];
        self.states[i] = to;
        Change {
            class: Class::ALL[i],
            from,
            to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdmissionStrategy::*;
    use ClassState::*;

    fn all_ladders(max_streak: u32) -> Vec<Ladder> {
        let mut out = Vec::new();
        for a in ClassState::ALL {
            for b in ClassState::ALL {
                for c in ClassState::ALL {
                    for healthy_beats in 0..=max_streak {
                        out.push(Ladder {
                            states: [a, b, c],
                            healthy_beats,
                        });
                    }
                }
            }
        }
        out
    }

    fn all_breaches() -> Vec<[bool; 3]> {
        (0..8)
            .map(|m| [m & 1 != 0, m & 2 != 0, m & 4 != 0])
            .collect()
    }

    /// Every state × every input × both strategies: the ladder's invariants.
    #[test]
    fn exhaustive_invariants() {
        let recover = 3;
        for strategy in [Strict, Degrade] {
            let shed = if strategy == Strict { Paused } else { Degraded };
            for start in all_ladders(recover + 1) {
                for breach in all_breaches() {
                    let mut l = start;
                    let change = l.step(breach, strategy, recover);
                    let differing = (0..3).filter(|i| l.states[*i] != start.states[*i]).count();
                    assert!(
                        differing <= 1,
                        "{start:?} {breach:?}: more than one class changed"
                    );
                    assert_eq!(change.is_some(), differing == 1, "{start:?} {breach:?}");
                    if let Some(hot) = breach.iter().position(|b| *b) {
                        assert_eq!(l.healthy_beats, 0, "a breach resets the streak");
                        if let Some(c) = change {
                            let i = c.class.index();
                            assert_eq!((c.from, c.to), (Normal, shed), "a breach only sheds");
                            assert!(i >= hot, "only the breaching class or colder ones are shed");
                            // Colder classes go first: everything colder than the shed one was
                            // already shed.
                            for j in i + 1..3 {
                                assert_ne!(
                                    start.states[j], Normal,
                                    "{start:?} {breach:?}: {j} should go first"
                                );
                            }
                            if i == hot {
                                assert!(i != 0 || strategy == Strict, "R1 is never parked");
                            }
                        } else {
                            // Nothing left to shed.
                            for j in hot..3 {
                                let exempt = j == 0 && strategy == Degrade;
                                assert!(
                                    start.states[j] != Normal || exempt,
                                    "{start:?} {breach:?}: {j} could be shed"
                                );
                            }
                        }
                    } else if let Some(c) = change {
                        assert_eq!(c.to, Normal, "a healthy beat only restores");
                        assert!(
                            start.healthy_beats + 1 >= recover,
                            "recovery needs {recover} healthy beats"
                        );
                        let i = c.class.index();
                        for j in 0..i {
                            assert_eq!(
                                start.states[j], Normal,
                                "the hottest shed class recovers first"
                            );
                        }
                        assert_eq!(l.healthy_beats, 0);
                    } else {
                        assert!(
                            start.healthy_beats + 1 < recover || start.states == [Normal; 3],
                            "{start:?}: a recovery was due"
                        );
                    }
                    if strategy == Degrade && start.states[0] != Degraded {
                        assert_ne!(l.states[0], Degraded, "R1 is never parked");
                    }
                }
            }
        }
    }

    #[test]
    fn an_r1_breach_walks_down_the_ladder_and_recovers_after_the_streak() {
        let mut l = Ladder::default();
        let r1 = [true, false, false];
        assert_eq!(l.step(r1, Strict, 2).map(|c| c.class), Some(Class::C1));
        assert_eq!(l.step(r1, Strict, 2).map(|c| c.class), Some(Class::W1));
        assert_eq!(
            l.step(r1, Strict, 2).map(|c| c.class),
            Some(Class::R1),
            "Strict: R1 refuses, visibly"
        );
        assert_eq!(l.states, [Paused; 3]);
        assert_eq!(l.step(r1, Strict, 2), None);
        let ok = [false; 3];
        assert_eq!(
            l.step(ok, Strict, 2),
            None,
            "one healthy beat is not enough"
        );
        assert_eq!(
            l.step(ok, Strict, 2).map(|c| (c.class, c.to)),
            Some((Class::R1, Normal))
        );
        assert_eq!(l.step(ok, Strict, 2), None);
        assert_eq!(l.step(ok, Strict, 2).map(|c| c.class), Some(Class::W1));
        assert_eq!(
            l.step([false, false, true], Strict, 2),
            None,
            "C1 is shed already; it cannot shed itself further"
        );
        assert_eq!(l.healthy_beats, 0, "but the breach resets the streak");

        let mut d = Ladder::default();
        for _ in 0..5 {
            d.step(r1, Degrade, 2);
        }
        assert_eq!(
            d.states,
            [Normal, Degraded, Degraded],
            "Degrade parks W1 and C1 but never R1"
        );
    }
}
