//! `cargo xtask bench` (part 2): the policy API's cost, over real gRPC (needs root).
//!
//! 1. `ApplyPolicy` latency, measured by the client from the call until the response, which the
//!    server sends only after the kernel switch: 1, 1,000 and 100,000 rules, alternating between
//!    two documents so that every call changes the policy. Back-to-back calls, with the agent's
//!    background tick reclaiming retired slots as in `knhk-agent run`.
//! 2. Policy-update throughput while two processes connect in a loop, against the same loop with
//!    no updates.

#[path = "../../tests/support/mod.rs"]
mod support;

use knhk_agent::{
    api::{self, pb, pb::policy_service_client::PolicyServiceClient},
    config::Config,
    control::Controller,
    datapath::{Datapath, DatapathOptions},
};
use std::{
    sync::atomic::{AtomicBool, Ordering},
    sync::Arc,
    time::{Duration, Instant},
};
use support::*;

fn document(rules: usize, variant: u32, port: u16) -> pb::PolicyDocument {
    let mut out = vec![pb::Rule {
        name: "target".into(),
        action: pb::Action::Allow as i32,
        cidrs: vec!["127.0.0.1/32".into()],
        ports: vec![port.to_string()],
        ..Default::default()
    }];
    for i in 1..rules {
        out.push(pb::Rule {
            name: format!("deny-{i}"),
            action: pb::Action::Deny as i32,
            cidrs: vec![format!(
                "10.{}.{}.{}/32",
                (i >> 16) & 255,
                (i >> 8) & 255,
                (i & 255) as u32 ^ variant
            )],
            ..Default::default()
        });
    }
    pb::PolicyDocument {
        rules: out,
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    // RUST_LOG=knhk_agent::datapath=debug shows each apply's compile and write times.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if !kernel_available("bench_api") {
        std::process::exit(1);
    }
    let target = tcp_sink("127.0.0.1:0");
    let cg = TestCgroup::new("bench-api");
    let pins = TestPins::new("bench-api");
    let text = format!(
        "[agent]\ncgroup_root = \"{}\"\npin_root = \"{}\"\n[[policy.rules]]\nname = \"target\"\naction = \"allow\"\ncidrs = [\"127.0.0.1/32\"]\n",
        cg.path.display(),
        pins.root.display()
    );
    let config = Config::parse(&text, "bench").expect("config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dp = Datapath::start(&DatapathOptions {
            cgroup_root: cg.path.clone(),
            pin_root: pins.root.clone(),
            heat_max_entries: 65_536,
        })
        .expect("datapath");
        let controller = Controller::start(dp, &config, tokio::sync::broadcast::channel(1024).0, None, None)
            .await
            .expect("controller");
        let listener = api::ApiListener::Tcp(
            api::bind_tcp("127.0.0.1:0".parse().expect("addr"), false).await.expect("bind"),
        );
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = api::serve(listener, 64 << 20, controller.clone(), Default::default(), async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
        // The agent's background tick: follows cgroups and reclaims retired slots.
        let ticker = {
            let controller = controller.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_millis(25));
                loop {
                    t.tick().await;
                    let _ = controller.tick(|dp| dp.refresh_scopes()).await;
                }
            })
        };
        let mut client = PolicyServiceClient::connect(format!("http://{}", server.local_addr))
            .await
            .expect("connect")
            .max_encoding_message_size(64 << 20);

        println!("knhk-agent policy API benchmark (real gRPC on loopback, back-to-back calls, background reclaim every 25 ms)");
        println!("ApplyPolicy latency, call to response (the kernel switch happens before the response):");
        for (rules, calls, goal) in [(1usize, 200u32, ""), (1_000, 100, "  (goal p99 <= 5 ms)"), (100_000, 12, "  (goal p99 <= 500 ms)")] {
            let docs = [document(rules, 0, target.port()), document(rules, 1, target.port())];
            let (mut samples, mut server) = (Vec::new(), Vec::new());
            for i in 0..calls {
                let req = pb::ApplyPolicyRequest { policy: Some(docs[(i % 2) as usize].clone()), expected_generation: None };
                let start = Instant::now();
                let r = client.apply_policy(req).await.expect("apply").into_inner();
                samples.push(start.elapsed().as_secs_f64() * 1e3);
                server.push(r.switch_micros as f64 / 1e3);
            }
            if std::env::var_os("KNHK_BENCH_DEBUG").is_some() {
                let mut idx: Vec<usize> = (0..samples.len()).collect();
                idx.sort_by(|a, b| samples[*b].total_cmp(&samples[*a]));
                eprintln!("slowest calls: {:?}", idx.iter().take(3).map(|i| (*i, samples[*i], server[*i])).collect::<Vec<_>>());
            }
            samples.sort_by(f64::total_cmp);
            server.sort_by(f64::total_cmp);
            println!(
                "  {rules:>7} rules: p50 {:8.2} ms   p99 {:8.2} ms   (server, decoded request to kernel switch: p50 {:.2} ms, p99 {:.2} ms; {calls} calls){goal}",
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                percentile(&server, 0.5),
                percentile(&server, 0.99),
            );
        }

        // Throughput: two connect loops, with and without back-to-back 1,000-rule updates.
        let docs = [document(1_000, 0, target.port()), document(1_000, 1, target.port())];
        client
            .apply_policy(pb::ApplyPolicyRequest { policy: Some(docs[0].clone()), expected_generation: None })
            .await
            .expect("apply");
        // The connect loops run in two cgroups under the agent's root.
        let a = cg.child("load-a");
        let b = cg.child("load-b");
        let connects = 100_000u64;
        let run_loops = move || {
            let (a, b) = (a.clone(), b.clone());
            let start = Instant::now();
            let ta = std::thread::spawn(move || tcp_connect_loop_from(&a, target, connects));
            let tb = std::thread::spawn(move || tcp_connect_loop_from(&b, target, connects));
            let (ca, cb) = (ta.join().expect("loop a"), tb.join().expect("loop b"));
            assert_eq!((ca.connected, cb.connected), (connects, connects), "{ca:?} {cb:?}");
            2.0 * connects as f64 / start.elapsed().as_secs_f64()
        };
        let quiet = tokio::task::spawn_blocking(run_loops.clone()).await.expect("loops");
        let stop = Arc::new(AtomicBool::new(false));
        let loops = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                let rate = run_loops();
                stop.store(true, Ordering::Relaxed);
                rate
            })
        };
        let (mut applies, started) = (0u32, Instant::now());
        while !stop.load(Ordering::Relaxed) {
            let req = pb::ApplyPolicyRequest { policy: Some(docs[(applies % 2) as usize].clone()), expected_generation: None };
            client.apply_policy(req).await.expect("apply");
            applies += 1;
        }
        let busy = loops.await.expect("loops");
        let secs = started.elapsed().as_secs_f64();
        println!("policy updates (1,000 rules each) while two processes connect in a loop:");
        println!("  {:.0} updates/s ({applies} in {secs:.1} s)", applies as f64 / secs);
        println!(
            "  connects/s: {quiet:.0} without updates, {busy:.0} during updates (ratio {:.3}); every connect was admitted",
            busy / quiet
        );
        ticker.abort();
    });
}
