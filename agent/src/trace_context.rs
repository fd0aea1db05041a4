//! W3C Trace Context (`traceparent`) across gRPC calls: the parent a caller sends is extracted
//! from the request metadata, and the current span is injected into outgoing requests (region
//! sync pushes to witnesses). Pure parsing and formatting over the OpenTelemetry API; without an
//! SDK installed (the `otlp` feature off or export not configured) spans are no-ops, but a caller's
//! trace id still passes through.

use opentelemetry::{
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};

/// The metadata key of the W3C parent.
pub const TRACEPARENT: &str = "traceparent";

/// Parses a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when malformed or
/// all-zero (the spec says to ignore such a header and start a new trace).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    ))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The `traceparent` of a span context, or `None` for an invalid one.
pub fn format_traceparent(sc: &SpanContext) -> Option<String> {
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The context a gRPC request carries: its remote parent, or an empty context.
pub fn extract(metadata: &tonic::metadata::MetadataMap) -> Context {
    metadata
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
        .map(|sc| Context::new().with_remote_span_context(sc))
        .unwrap_or_default()
}

/// Adds `cx`'s span as the `traceparent` of an outgoing request (nothing for an empty context).
pub fn inject(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(v) = format_traceparent(cx.span().span_context())
        .and_then(|s| tonic::metadata::MetadataValue::try_from(s.as_str()).ok())
    {
        metadata.insert(TRACEPARENT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trip() {
        let sc = parse_traceparent(EXAMPLE).expect("the spec's example parses");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format_traceparent(&sc).as_deref(), Some(EXAMPLE));
    }

    #[test]
    fn malformed_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_round_trip() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(TRACEPARENT, EXAMPLE.parse().expect("ascii"));
        let cx = extract(&md);
        let mut out = tonic::metadata::MetadataMap::new();
        inject(&cx, &mut out);
        assert_eq!(
            out.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some(EXAMPLE)
        );
        assert!(!extract(&tonic::metadata::MetadataMap::new()).has_active_span());
    }
}
