//! Log capture: line splitting, secret masking, escaping and the size cap.

use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::{LogLine, Stream};

/// Secrets (and lines of multi-line secrets) shorter than this are not masked: masking `"ab"` or `"1"`
/// everywhere would destroy the log while protecting nothing (such a value is guessable anyway).
pub const MIN_SECRET_LEN: usize = 4;

/// Longest log line; longer lines are split (at a UTF-8 character boundary).
pub(crate) const MAX_LINE: usize = 64 * 1024;

const MASK: &str = "***";

/// Replaces secrets and their usual encodings with `***`.
///
/// Masked forms of each secret `s` (and of each line of a multi-line secret): `s` itself; standard and
/// URL-safe base64 of `s`, padded and unpadded; percent-encoding of `s` (every byte outside
/// `A-Za-z0-9-._~` encoded, hex in upper or lower case, and the form-encoding variant with `+` for space).
///
/// Not masked (known limitations, see the tests): other transforms (hex, reversed, ROT13, gzip, ...),
/// base64 of a longer string that contains the secret (e.g. `user:secret` in Basic auth), base64 wrapped
/// over several lines, and a secret cut by the 64 KiB line split.
#[derive(Clone, Debug, Default)]
pub(crate) struct Masker {
    /// Longest first, so that a padded form wins over its unpadded prefix.
    patterns: Vec<String>,
}

impl Masker {
    pub(crate) fn new(secrets: &[String]) -> Self {
        let mut patterns = Vec::new();
        for secret in secrets {
            let mut values = vec![secret.as_str()];
            if secret.contains('\n') {
                values.extend(secret.lines().map(|l| l.trim_end_matches('\r')));
            }
            for v in values {
                if v.chars().count() < MIN_SECRET_LEN {
                    continue;
                }
                patterns.push(v.to_owned());
                for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                    patterns.push(engine.encode(v));
                }
                for upper in [true, false] {
                    for plus in [false, true] {
                        patterns.push(percent_encode(v, upper, plus));
                    }
                }
            }
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Masker { patterns }
    }

    pub(crate) fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for p in &self.patterns {
            if out.contains(p.as_str()) {
                out = out.replace(p.as_str(), MASK);
            }
        }
        out
    }
}

fn percent_encode(s: &str, upper: bool, plus_for_space: bool) -> String {
    const UP: &[u8; 16] = b"0123456789ABCDEF";
    const LO: &[u8; 16] = b"0123456789abcdef";
    let hex = if upper { UP } else { LO };
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else if b == b' ' && plus_for_space {
            out.push('+');
        } else {
            out.push('%');
            out.push(char::from(hex[usize::from(b >> 4)]));
            out.push(char::from(hex[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Escapes characters that could break the record a line is stored in or fool a viewer: control characters
/// (C0 except tab, DEL, C1), line/paragraph separators and bidi overrides become `\u{..}`.
pub(crate) fn escape(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Splits a byte stream into lines: on `\n` (a `\r` right before it is dropped), lines longer than
/// [`MAX_LINE`] cut at a character boundary. Holds at most one line.
#[derive(Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Appends `data`; complete lines are pushed to `out`.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<Vec<u8>>) {
        for piece in data.split_inclusive(|b| *b == b'\n') {
            let (mut content, newline) = match piece.split_last() {
                Some((b'\n', rest)) => (rest, true),
                _ => (piece, false),
            };
            while self.line.len() + content.len() > MAX_LINE {
                let take = MAX_LINE - self.line.len();
                self.line.extend_from_slice(&content[..take]);
                content = &content[take..];
                let cut = utf8_cut(&self.line);
                let rest = self.line.split_off(cut);
                out.push(std::mem::replace(&mut self.line, rest));
            }
            self.line.extend_from_slice(content);
            if newline {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                out.push(std::mem::take(&mut self.line));
            }
        }
    }

    /// Pushes the trailing partial line, if any.
    pub(crate) fn finish(&mut self, out: &mut Vec<Vec<u8>>) {
        if !self.line.is_empty() {
            out.push(std::mem::take(&mut self.line));
        }
    }
}

/// Where to cut `buf` so that no UTF-8 sequence is split: before an incomplete sequence at its end.
fn utf8_cut(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=3.min(len) {
        let i = len - back;
        let b = buf[i];
        if b & 0xc0 == 0x80 {
            continue; // continuation byte, look further back
        }
        let need = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if need > back && i > 0 { i } else { len };
    }
    len
}

struct SinkState {
    bytes: u64,
    truncated: bool,
}

/// Sends masked, escaped lines to the log channel and enforces the size cap.
pub(crate) struct LogSink {
    tx: mpsc::Sender<LogLine>,
    masker: Masker,
    max_bytes: u64,
    state: Mutex<SinkState>,
}

impl LogSink {
    pub(crate) fn new(tx: mpsc::Sender<LogLine>, secrets: &[String], max_bytes: usize) -> Self {
        LogSink {
            tx,
            masker: Masker::new(secrets),
            max_bytes: u64::try_from(max_bytes).unwrap_or(u64::MAX),
            state: Mutex::new(SinkState { bytes: 0, truncated: false }),
        }
    }

    pub(crate) fn mask(&self, text: &str) -> String {
        self.masker.mask(text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_truncated(&self) -> bool {
        self.lock().truncated
    }

    /// `(bytes sent, truncated)`.
    pub(crate) fn totals(&self) -> (u64, bool) {
        let s = self.lock();
        (s.bytes, s.truncated)
    }

    /// Sends one line of task output (counted against the cap).
    pub(crate) async fn output(&self, stream: Stream, raw: &[u8]) {
        let text = escape(&self.masker.mask(&String::from_utf8_lossy(raw)));
        let len = u64::try_from(text.len()).unwrap_or(u64::MAX);
        let marker = {
            let mut s = self.lock();
            if s.truncated {
                return;
            }
            if s.bytes.saturating_add(len) > self.max_bytes {
                s.truncated = true;
                let marker = format!("[log truncated after {} bytes]", s.bytes);
                s.bytes = s.bytes.saturating_add(u64::try_from(marker.len()).unwrap_or(0));
                Some(marker)
            } else {
                s.bytes += len;
                None
            }
        };
        match marker {
            Some(m) => self.send(Stream::System, m).await,
            None => self.send(stream, text).await,
        }
    }

    /// Sends a message of the executor (masked, escaped, counted but never suppressed by the cap).
    pub(crate) async fn system(&self, text: &str) {
        let text = escape(&self.masker.mask(text));
        {
            let mut s = self.lock();
            s.bytes = s.bytes.saturating_add(u64::try_from(text.len()).unwrap_or(0));
        }
        self.send(Stream::System, text).await;
    }

    async fn send(&self, stream: Stream, text: String) {
        // A dropped receiver only means nobody listens any more; the task goes on.
        let _ = self.tx.send(LogLine { stream, at: chrono::Utc::now(), text }).await;
    }

    /// Sends a block of bytes (e.g. an HTTP body) as lines of `stream`.
    pub(crate) async fn output_bytes(&self, stream: Stream, data: &[u8]) {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        splitter.feed(data, &mut lines);
        splitter.finish(&mut lines);
        for l in lines {
            if self.is_truncated() {
                break;
            }
            self.output(stream, &l).await;
        }
    }
}

/// Reads `reader` to its end, sending its lines; after truncation it keeps reading (so the writer never
/// blocks) but discards. Memory: one read buffer plus one line.
pub(crate) async fn pump<R: AsyncRead + Unpin>(mut reader: R, stream: Stream, sink: &LogSink) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut splitter = LineSplitter::default();
    let mut lines = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if sink.is_truncated() {
            continue;
        }
        splitter.feed(&buf[..n], &mut lines);
        for l in lines.drain(..) {
            sink.output(stream, &l).await;
        }
    }
    if !sink.is_truncated() {
        splitter.finish(&mut lines);
        for l in lines.drain(..) {
            sink.output(stream, &l).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn splits_lines_across_chunks_and_flushes_partial() {
        let out = split(&[b"ab", b"c\nde", b"f\r\n\ng"]);
        assert_eq!(out, vec![b"abc".to_vec(), b"def".to_vec(), b"".to_vec(), b"g".to_vec()]);
    }

    #[test]
    fn long_lines_split_at_char_boundary() {
        let mut data = vec![b'a'; MAX_LINE - 1];
        data.extend_from_slice("é".as_bytes()); // 2 bytes straddling the limit
        data.extend_from_slice(b"tail\n");
        let out = split(&[&data]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_LINE - 1);
        assert_eq!(String::from_utf8(out[1].clone()).ok().as_deref(), Some("étail"));
        let big = vec![b'x'; 3 * MAX_LINE + 5];
        let out = split(&[&big]);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_LINE, MAX_LINE, MAX_LINE, 5]);
    }

    #[test]
    fn masks_all_forms_longest_first() {
        let m = Masker::new(&["s3cr et/+?".to_owned(), "ab".to_owned()]);
        let s = "s3cr et/+?";
        for form in [
            s.to_owned(),
            STANDARD.encode(s),
            STANDARD_NO_PAD.encode(s),
            URL_SAFE.encode(s),
            URL_SAFE_NO_PAD.encode(s),
            percent_encode(s, true, false),
            percent_encode(s, false, true),
        ] {
            assert_eq!(m.mask(&format!("x {form} y")), "x *** y", "form {form}");
        }
        assert_eq!(m.mask("ab cab"), "ab cab", "short secrets are ignored");
    }

    #[test]
    fn multiline_secret_lines_masked() {
        let m = Masker::new(&["-----BEGIN KEY-----\nMIIBsecretline\n-----END KEY-----\n".to_owned()]);
        assert_eq!(m.mask("MIIBsecretline"), "***");
    }

    #[test]
    fn escapes_controls() {
        assert_eq!(escape("a\tb\u{1b}[31m\r\0\u{7f}\u{202e}"), "a\tb\\u{1b}[31m\\u{d}\\u{0}\\u{7f}\\u{202e}");
        assert_eq!(escape("plain é"), "plain é");
    }
}
