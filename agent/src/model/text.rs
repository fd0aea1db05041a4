//! Text from outside (cgroup paths, rule names) made safe to log, and errors as one line.

/// `s` made safe to write into a log line: control characters (newlines, terminal escape codes)
/// and invisible bidirectional-text controls are escaped as in Rust string literals (`\n`,
/// `\u{1b}`, `\u{202e}`), and so are backslashes (so an escape in the output is unambiguous).
/// Names that come from policies or the file system, such as cgroup paths, go through it, so
/// that they cannot forge log lines or drive a terminal. Borrowed when there is nothing to escape.
pub fn log_escape(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || c == '\\'
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// An error and its causes, `: `-separated, a cause whose text the line already holds skipped:
/// library errors (aya, tonic's transport) often say what failed on top and why only in a source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::log_escape;

    #[test]
    fn log_escape_escapes_newlines_escape_codes_and_backslashes_only() {
        assert_eq!(
            log_escape("kubepods/burstable/pod-1"),
            "kubepods/burstable/pod-1"
        );
        assert!(matches!(log_escape("a/b"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            log_escape("x\n INFO forged\r\t\u{1b}[31m\\n\u{202e}\u{7f}é"),
            "x\\n INFO forged\\r\\t\\u{1b}[31m\\\\n\\u{202e}\\u{7f}é"
        );
    }

    #[test]
    fn an_escaped_name_stays_on_one_log_line() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let name = "pods/x\n2026-01-01T00:00:00Z  INFO FORGED \u{1b}[2J";
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(cgroup = %log_escape(name), "rule cgroup does not exist yet");
        });
        let out = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("cgroup=pods/x\\n2026"), "{out}");
    }
}
