//! `process_*` metrics of the agent itself, read from `/proc/self` at scrape time: the names
//! and meanings of the Prometheus client libraries' process collectors.
//!
//! | metric | type |
//! |---|---|
//! | `process_cpu_seconds_total` | counter |
//! | `process_resident_memory_bytes`, `process_virtual_memory_bytes` | gauge |
//! | `process_open_fds`, `process_max_fds` | gauge |
//! | `process_start_time_seconds` | gauge |
//! | `process_threads` | gauge |
//!
//! A value that cannot be read is left out of that scrape (never NaN).

use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

const FAMILIES: [(&str, &str, MetricType); 7] = [
    (
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        MetricType::COUNTER,
    ),
    (
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        MetricType::GAUGE,
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        MetricType::GAUGE,
    ),
    (
        "process_open_fds",
        "Number of open file descriptors.",
        MetricType::GAUGE,
    ),
    (
        "process_max_fds",
        "Maximum number of open file descriptors.",
        MetricType::GAUGE,
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        MetricType::GAUGE,
    ),
    (
        "process_threads",
        "Number of OS threads in the process.",
        MetricType::GAUGE,
    ),
];

/// Collects the `process_*` metrics of this process.
pub struct ProcessCollector {
    descs: Vec<Desc>,
}

impl std::fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessCollector").finish_non_exhaustive()
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, help, _)| {
                // Static names and help: valid; a bad one would only drop that family.
                Desc::new((*name).into(), (*help).into(), vec![], Default::default()).ok()
            })
            .collect();
        ProcessCollector { descs }
    }
}

/// What `/proc/self/stat` says, in the units exported.
#[derive(Debug, Default, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    threads: f64,
    start_seconds_after_boot: f64,
    virtual_bytes: f64,
    resident_bytes: f64,
}

/// Parses `/proc/self/stat` (fields after the parenthesized command, which may hold spaces).
fn parse_stat(text: &str, ticks_per_second: f64, page_size: f64) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_seconds: (num(14)? + num(15)?) / ticks_per_second,
        threads: num(20)?,
        start_seconds_after_boot: num(22)? / ticks_per_second,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page_size,
    })
}

/// The soft limit on open files from `/proc/self/limits`.
fn parse_max_fds(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Boot time, seconds since the epoch, from `/proc/stat`.
fn parse_btime(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let stat =
            read("/proc/self/stat").and_then(|t| parse_stat(&t, ticks.max(1.0), page.max(1.0)));
        let btime = read("/proc/stat").and_then(|t| parse_btime(&t));
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64);
        let max_fds = read("/proc/self/limits").and_then(|t| parse_max_fds(&t));
        let values = [
            stat.as_ref().map(|s| s.cpu_seconds),
            stat.as_ref().map(|s| s.resident_bytes),
            stat.as_ref().map(|s| s.virtual_bytes),
            open_fds,
            max_fds,
            stat.as_ref()
                .zip(btime)
                .map(|(s, b)| b + s.start_seconds_after_boot),
            stat.as_ref().map(|s| s.threads),
        ];
        FAMILIES
            .iter()
            .zip(values)
            .filter_map(|((name, help, kind), value)| {
                let value = value?;
                let mut m = proto::Metric::default();
                if *kind == MetricType::COUNTER {
                    let mut c = proto::Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
                let mut f = MetricFamily::default();
                f.set_name((*name).into());
                f.set_help((*help).into());
                f.set_field_type(*kind);
                f.set_metric(vec![m]);
                Some(f)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and a parenthesis, as /proc shows it.
        let line = "42 (knhk (agent) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615";
        let s = parse_stat(line, 100.0, 4096.0).expect("parses");
        assert_eq!(
            s,
            Stat {
                cpu_seconds: 4.0,
                threads: 7.0,
                start_seconds_after_boot: 10.0,
                virtual_bytes: 123456789.0,
                resident_bytes: 2048.0 * 4096.0,
            }
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096.0), None);
    }

    #[test]
    fn limits_and_btime_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024.0));
        assert_eq!(parse_btime("cpu 1 2\nbtime 1700000000\n"), Some(1.7e9));
    }

    #[test]
    fn this_process_is_collected_without_nan() {
        let families = ProcessCollector::default().collect();
        assert_eq!(families.len(), FAMILIES.len(), "every value read here");
        for f in families {
            let m = &f.get_metric()[0];
            let v = if f.get_field_type() == MetricType::COUNTER {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            };
            assert!(v.is_finite() && v >= 0.0, "{}: {v}", f.name());
        }
    }
}
