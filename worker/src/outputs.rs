//! The `$SLUICE_OUTPUT` file: `key=value` lines.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Bytes of the outputs file read at most.
pub(crate) const MAX_OUTPUT_FILE: usize = 64 * 1024;

/// Invalid lines reported individually at most (then one summary).
const MAX_REPORTED: usize = 20;

/// Reads the outputs file written by the task: at most [`MAX_OUTPUT_FILE`] bytes, whole lines
/// only, and whether anything was left out. The task controls the file, so it is opened without
/// following symlinks and accepted only when it is a regular file with one link owned by `owner`
/// (a task must not make the worker read e.g. `/etc/shadow` through a link).
pub(crate) fn read_file(path: &Path, owner: u32) -> Result<(Vec<u8>, bool), String> {
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(format!("cannot open the outputs file: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot stat the outputs file: {e}"))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 || meta.uid() != owner {
        return Err("the outputs file is not a regular file owned by the task; ignored".to_owned());
    }
    let mut data = Vec::new();
    let cap = u64::try_from(MAX_OUTPUT_FILE).unwrap_or(u64::MAX) + 1;
    file.take(cap).read_to_end(&mut data).map_err(|e| format!("cannot read the outputs file: {e}"))?;
    let truncated = data.len() > MAX_OUTPUT_FILE;
    if truncated {
        data.truncate(MAX_OUTPUT_FILE);
        drop_cut_line(&mut data);
    }
    Ok((data, truncated))
}

/// How much of a problem [`parse`] reports is shown, after masking.
pub(crate) const SHOWN_PROBLEM_CHARS: usize = 240;

/// Drops the last line of a file that was cut at [`MAX_OUTPUT_FILE`] when it has no newline:
/// its value is cut short, and a cut value must not reach later tasks as if it were whole.
fn drop_cut_line(data: &mut Vec<u8>) {
    let end = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    data.truncate(end);
}

/// Parses `key=value` lines (key `[A-Za-z_][A-Za-z0-9_]*`, value up to the end of the line, a final `\r`
/// dropped; later keys win). Empty lines are skipped; invalid ones are returned as problems.
pub(crate) fn parse(data: &[u8]) -> (BTreeMap<String, String>, Vec<String>) {
    let mut outputs = BTreeMap::new();
    let mut problems = Vec::new();
    let mut invalid = 0usize;
    for (i, raw) in data.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        match parse_line(raw) {
            Some((k, v)) => {
                outputs.insert(k, v);
            }
            None => {
                invalid += 1;
                if invalid <= MAX_REPORTED {
                    // Whole: the caller masks secrets in it before shortening it.
                    problems.push(format!(
                        "outputs file line {}: invalid, ignored: {}",
                        i + 1,
                        String::from_utf8_lossy(raw)
                    ));
                }
            }
        }
    }
    if invalid > MAX_REPORTED {
        problems.push(format!("outputs file: {} more invalid lines ignored", invalid - MAX_REPORTED));
    }
    (outputs, problems)
}

fn parse_line(raw: &[u8]) -> Option<(String, String)> {
    let line = std::str::from_utf8(raw).ok()?;
    let (key, value) = line.split_once('=')?;
    let mut chars = key.chars();
    let first = chars.next()?;
    if !(first.is_ascii_alphabetic() || first == '_') || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    if value.contains('\0') {
        return None;
    }
    Some((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_last_line_is_dropped_and_problems_are_whole() {
        let mut data = b"a=1\nb=2\ndigest=sha256:12".to_vec();
        drop_cut_line(&mut data);
        assert_eq!(data, b"a=1\nb=2\n");
        let mut data = b"digest=sha256:12".to_vec();
        drop_cut_line(&mut data);
        assert!(data.is_empty());
        let long = format!("export TOKEN={}", "x".repeat(300));
        let (_, problems) = parse(long.as_bytes());
        assert!(problems[0].ends_with(&long), "{problems:?}");
    }

    #[test]
    fn parses_valid_and_reports_invalid() {
        let (out, problems) = parse(b"a=1\r\n_b2=x=y\n\n1bad=2\nno equals\nc=\nd\xff=1\nk=\xffv\na=2");
        assert_eq!(out.get("a").map(String::as_str), Some("2"));
        assert_eq!(out.get("_b2").map(String::as_str), Some("x=y"));
        assert_eq!(out.get("c").map(String::as_str), Some(""));
        assert_eq!(out.len(), 3);
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
