//! OTLP/gRPC export of metrics and traces (`[telemetry]`, the `otlp` feature).
//!
//! Metrics: every counter and gauge of the registry ([`semconv::METRICS`]) is an observable
//! OpenTelemetry instrument whose callback reads the Prometheus family it is exported as, from
//! one `gather()` of the agent's Prometheus registry per export period, so `/metrics` and OTLP
//! cannot disagree. Prometheus labels become the registry's attributes (a label the registry does
//! not map is exported under its own name, which the registry tests refuse). The kernel's
//! histograms are not exported over OTLP (see the registry's notes).
//!
//! Traces: spans go from the SDK to a bounded queue (`max_queued_spans`) through
//! `try_send`, so ending a span never waits; one task sends batches with `otlp_timeout_ms` per
//! call. Everything that cannot be queued, or that the collector does not accept in time, is
//! dropped and counted (`knhk_telemetry_dropped_total`).

use crate::{
    config::TelemetrySettings,
    semconv::{self, Instrument, MetricDef},
};
use opentelemetry::{
    metrics::{AsyncInstrument, MeterProvider as _},
    KeyValue,
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        data::ResourceMetrics, exporter::PushMetricExporter, reader::MetricReader, InstrumentKind,
        ManualReader, Pipeline, SdkMeterProvider, Temporality,
    },
    trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor},
    Resource,
};
use prometheus::{proto::MetricFamily, IntCounterVec, Opts};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, watch};

/// Spans sent in one export call at most.
const MAX_BATCH: usize = 512;
/// How long the span task waits for more spans before sending a partial batch.
const LINGER: Duration = Duration::from_millis(200);

/// What OTLP export could not start with.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The exporter could not be built (a bad endpoint or header).
    #[error("telemetry: the OTLP exporter could not be built: {0}")]
    Build(String),
    /// The drop counters could not be registered.
    #[error("telemetry: registering the export metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Facts about this agent for the resource.
#[derive(Debug, Clone, Default)]
pub struct ResourceInfo {
    /// `service.instance.id`: unique per agent process.
    pub instance_id: String,
    /// `cloud.region` (`[multi_region] region`).
    pub region: Option<String>,
}

/// The running export: the tracer provider is installed as the global one while this lives.
pub struct Otlp {
    tracer: SdkTracerProvider,
    meters: SdkMeterProvider,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Counters {
    dropped: IntCounterVec,
    exported: IntCounterVec,
}

impl Counters {
    fn register(registry: &prometheus::Registry) -> Result<Counters, prometheus::Error> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "knhk_telemetry_dropped_total",
                "Spans and metric exports the OTLP exporter dropped, by signal and reason (export never blocks the agent).",
            ),
            &["signal", "reason"],
        )?;
        let exported = IntCounterVec::new(
            Opts::new(
                "knhk_telemetry_exported_total",
                "Spans and metric exports the collector accepted, by signal.",
            ),
            &["signal"],
        )?;
        for signal in ["traces", "metrics"] {
            exported.with_label_values(&[signal]);
            for reason in ["queue_full", "export_failed"] {
                dropped.with_label_values(&[signal, reason]);
            }
        }
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(exported.clone()))?;
        Ok(Counters { dropped, exported })
    }

    fn drop(&self, signal: &str, reason: &str, n: u64) {
        self.dropped.with_label_values(&[signal, reason]).inc_by(n);
    }
}

/// Hands finished spans to the export task without waiting: a full queue drops the span.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    dropped: prometheus::IntCounter,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// A [`ManualReader`] the export task collects from while the meter provider owns its pipeline.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

type Snapshot = Arc<Mutex<HashMap<String, MetricFamily>>>;

fn metadata(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<tonic::metadata::MetadataMap, OtlpError> {
    let mut md = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
            .map_err(|e| OtlpError::Build(format!("otlp_headers.{k}: {e}")))?;
        let value = v
            .parse()
            .map_err(|e| OtlpError::Build(format!("otlp_headers.{k}: {e}")))?;
        md.insert(key, value);
    }
    Ok(md)
}

fn resource(settings: &TelemetrySettings, info: &ResourceInfo) -> Resource {
    use semconv::attr;
    let mut kvs = vec![
        KeyValue::new(attr::SERVICE_NAME, "knhk-agent"),
        KeyValue::new(attr::SERVICE_VERSION, env!("CARGO_PKG_VERSION")),
        KeyValue::new(attr::SERVICE_INSTANCE_ID, info.instance_id.clone()),
    ];
    for (key, var) in [
        (attr::K8S_NODE_NAME, "NODE_NAME"),
        (attr::K8S_POD_NAME, "POD_NAME"),
    ] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
            kvs.push(KeyValue::new(key, v));
        }
    }
    if let Some(r) = &info.region {
        kvs.push(KeyValue::new(attr::CLOUD_REGION, r.clone()));
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        kvs.push(KeyValue::new(attr::HOST_NAME, h.trim().to_owned()));
    }
    for (k, v) in &settings.resource_attributes {
        kvs.push(KeyValue::new(k.clone(), v.clone()));
    }
    Resource::builder_empty().with_attributes(kvs).build()
}

/// The attributes of one Prometheus series under `def`'s label map.
fn attributes(def: &MetricDef, m: &prometheus::proto::Metric) -> Vec<KeyValue> {
    m.get_label()
        .iter()
        .map(|l| {
            let key = def
                .labels
                .iter()
                .find(|(label, _)| *label == l.name())
                .map_or_else(|| l.name().to_owned(), |(_, a)| (*a).to_owned());
            KeyValue::new(key, l.value().to_owned())
        })
        .collect()
}

fn observe(def: &'static MetricDef, snapshot: &Snapshot, obs: &dyn AsyncInstrument<f64>) {
    // A poisoned snapshot (a panicked collection) reports nothing this period.
    let Ok(families) = snapshot.lock() else {
        return;
    };
    let Some(family) = families.get(def.prometheus) else {
        return;
    };
    for m in family.get_metric() {
        let value = match def.instrument {
            Instrument::Counter => m.get_counter().get_value(),
            _ => m.get_gauge().get_value(),
        };
        obs.observe(value, &attributes(def, m));
    }
}

impl Otlp {
    /// Builds the exporters (they connect lazily: an unreachable collector only drops), installs
    /// the global tracer provider and starts the export tasks on the current runtime. Metrics are
    /// read from `registry`, where the drop counters are registered too.
    pub fn start(
        settings: &TelemetrySettings,
        registry: &prometheus::Registry,
        info: ResourceInfo,
    ) -> Result<Otlp, OtlpError> {
        let counters = Counters::register(registry)?;
        let resource = resource(settings, &info);
        let md = metadata(&settings.headers)?;
        // https://: the system's roots (a private CA goes into the system store).
        let tls = settings
            .endpoint
            .starts_with("https://")
            .then(|| tonic::transport::ClientTlsConfig::new().with_native_roots());
        let mut spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .with_metadata(md.clone());
        if let Some(t) = &tls {
            spans = spans.with_tls_config(t.clone());
        }
        let mut span_exporter = spans.build().map_err(|e| OtlpError::Build(e.to_string()))?;
        span_exporter.set_resource(&resource);
        let mut metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .with_metadata(md)
            .with_temporality(Temporality::Cumulative);
        if let Some(t) = tls {
            metrics = metrics.with_tls_config(t);
        }
        let metric_exporter = metrics
            .build()
            .map_err(|e| OtlpError::Build(e.to_string()))?;

        let (tx, rx) = mpsc::channel(settings.max_queued_spans);
        let processor = QueueProcessor {
            tx,
            dropped: counters
                .dropped
                .with_label_values(&["traces", "queue_full"]),
        };
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        )));
        let tracer = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource.clone())
            .build();
        opentelemetry::global::set_tracer_provider(tracer.clone());

        let reader = Arc::new(ManualReader::builder().build());
        let meters = SdkMeterProvider::builder()
            .with_reader(SharedReader(reader.clone()))
            .with_resource(resource)
            .build();
        let snapshot: Snapshot = Arc::default();
        let meter = meters.meter("knhk-agent");
        for def in semconv::METRICS.iter().filter(|d| d.otlp) {
            let snap = snapshot.clone();
            let cb = move |obs: &dyn AsyncInstrument<f64>| observe(def, &snap, obs);
            // The SDK keeps the callbacks; the handles are not needed.
            match def.instrument {
                Instrument::Counter => {
                    meter
                        .f64_observable_counter(def.name)
                        .with_unit(def.unit)
                        .with_description(def.brief)
                        .with_callback(cb)
                        .build();
                }
                Instrument::Gauge => {
                    meter
                        .f64_observable_gauge(def.name)
                        .with_unit(def.unit)
                        .with_description(def.brief)
                        .with_callback(cb)
                        .build();
                }
                Instrument::UpDownCounter => {
                    meter
                        .f64_observable_up_down_counter(def.name)
                        .with_unit(def.unit)
                        .with_description(def.brief)
                        .with_callback(cb)
                        .build();
                }
                Instrument::Histogram => {}
            }
        }

        let (stop, stopped) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(export_spans(
                span_exporter,
                rx,
                settings.timeout,
                counters.clone(),
                stopped.clone(),
            )),
            tokio::spawn(export_metrics(
                reader,
                metric_exporter,
                registry.clone(),
                snapshot,
                settings.export_interval,
                settings.timeout,
                counters,
                stopped,
            )),
        ];
        tracing::info!(
            endpoint = %settings.endpoint,
            live_check = settings.weaver_live_check,
            "telemetry: OTLP/gRPC export of metrics and traces on"
        );
        Ok(Otlp {
            tracer,
            meters,
            stop,
            tasks,
        })
    }

    /// Sends what is queued (one last metrics export, the queued spans), each within the export
    /// timeout, then stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.tracer.shutdown();
        let _ = self.meters.shutdown();
    }
}

async fn export_spans(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    timeout: Duration,
    counters: Counters,
    mut stop: watch::Receiver<bool>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                s = rx.recv() => s,
                _ = stop.changed() => { stopping = true; rx.try_recv().ok() }
            }
        };
        let Some(first) = first else {
            if stopping {
                return;
            }
            continue;
        };
        let mut batch = vec![first];
        let linger = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let next = if stopping {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(linger, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            match next {
                Some(s) => batch.push(s),
                None => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(timeout, exporter.export(batch)).await {
            Ok(Ok(())) => counters.exported.with_label_values(&["traces"]).inc_by(n),
            Ok(Err(e)) => {
                tracing::debug!("telemetry: span export failed: {e}");
                counters.drop("traces", "export_failed", n);
            }
            Err(_) => counters.drop("traces", "export_failed", n),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn export_metrics(
    reader: Arc<ManualReader>,
    exporter: opentelemetry_otlp::MetricExporter,
    registry: prometheus::Registry,
    snapshot: Snapshot,
    interval: Duration,
    timeout: Duration,
    counters: Counters,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = false;
    while !last {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => last = true,
        }
        let (r, reg, snap) = (reader.clone(), registry.clone(), snapshot.clone());
        // gather() reads the BPF maps: off the async workers.
        let collected = tokio::task::spawn_blocking(move || {
            let families = reg
                .gather()
                .into_iter()
                .map(|f| (f.name().to_owned(), f))
                .collect();
            if let Ok(mut s) = snap.lock() {
                *s = families;
            }
            let mut rm = ResourceMetrics::default();
            r.collect(&mut rm).map(|()| rm)
        })
        .await;
        let Ok(Ok(rm)) = collected else {
            counters.drop("metrics", "export_failed", 1);
            continue;
        };
        let started = Instant::now();
        match tokio::time::timeout(timeout, exporter.export(&rm)).await {
            Ok(Ok(())) => counters.exported.with_label_values(&["metrics"]).inc(),
            Ok(Err(e)) => {
                tracing::debug!("telemetry: metric export failed: {e}");
                counters.drop("metrics", "export_failed", 1);
            }
            Err(_) => counters.drop("metrics", "export_failed", 1),
        }
        // Periods that passed while a slow collector held the export were not collected.
        let missed = (started.elapsed().as_nanos() / interval.as_nanos().max(1)) as u64;
        if missed > 0 {
            counters.drop("metrics", "queue_full", missed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: &str) -> TelemetrySettings {
        let section: crate::config::TelemetrySection =
            toml::from_str(&format!("otlp_endpoint = \"{endpoint}\"")).expect("section");
        TelemetrySettings::from_section(&section)
            .expect("valid")
            .expect("on")
    }

    /// Every endpoint check-config accepts starts (nothing connects until the first export).
    #[tokio::test]
    async fn http_and_https_endpoints_start() {
        for e in ["http://127.0.0.1:4317", "https://collector.example:4317"] {
            let registry = prometheus::Registry::new();
            let otlp = Otlp::start(&settings(e), &registry, ResourceInfo::default())
                .unwrap_or_else(|err| panic!("{e}: {err}"));
            otlp.shutdown().await;
        }
    }
}
