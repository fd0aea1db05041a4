//! A datapath attached to a throwaway cgroup, for the kernel tests that drive `Datapath` directly.

use super::{TestCgroup, TestPins};
use knhk_agent::{
    config::Config,
    datapath::{Datapath, DatapathOptions, DatapathReader},
    policy::Policy,
};

/// A datapath attached to a throwaway cgroup with its own pins. Field order is drop order:
/// programs first, then pins (detaching them), then the cgroup.
pub struct Harness {
    pub dp: Datapath,
    pub pins: TestPins,
    pub cg: TestCgroup,
}

/// A policy from config text (panics on an invalid one).
pub fn policy(text: &str) -> std::sync::Arc<Policy> {
    std::sync::Arc::new(
        Config::parse(text, "test")
            .unwrap_or_else(|e| panic!("{e}"))
            .policy(),
    )
}

impl Harness {
    pub fn start(name: &str, config: &str) -> Harness {
        Self::start_with_heat(name, config, 1024)
    }

    pub fn start_with_heat(name: &str, config: &str, heat_max_entries: u32) -> Harness {
        let cg = TestCgroup::new(name);
        let pins = TestPins::new(name);
        let opts = DatapathOptions {
            cgroup_root: cg.path.clone(),
            pin_root: pins.root.clone(),
            heat_max_entries,
        };
        let mut dp = Datapath::start(&opts).unwrap_or_else(|e| panic!("datapath start: {e}"));
        dp.apply(&policy(config), None)
            .unwrap_or_else(|e| panic!("apply: {e}"));
        Harness { dp, pins, cg }
    }

    pub fn reader(&self) -> DatapathReader {
        DatapathReader::open(self.dp.pins()).expect("reader")
    }

    /// A beat engine over this datapath, driven by the test (`engine.beat()`), with the
    /// receiving end of its events.
    pub fn engine(
        &self,
        settings: knhk_agent::config::BeatSettings,
    ) -> (
        knhk_agent::beat::BeatEngine,
        tokio::sync::broadcast::Receiver<knhk_agent::model::Event>,
    ) {
        let (events, rx) = tokio::sync::broadcast::channel(64);
        let engine = knhk_agent::beat::BeatEngine::new(
            settings,
            self.reader(),
            self.dp.class_state_writer(),
            events,
            &prometheus::Registry::new(),
        )
        .expect("beat engine");
        (engine, rx)
    }

    pub fn hits(&self, rule: &str) -> u64 {
        let status = self.dp.status();
        let id = status
            .rule_counters
            .iter()
            .find(|(n, _)| n == rule)
            .map(|(_, id)| *id);
        self.reader()
            .rule_hits(id.unwrap_or_else(|| panic!("no rule {rule}")))
    }
}
