//! The 40-byte frame header of a stream file (doc/FORMAT.md §1.2).
//!
//! `KIND SP START SP LENGTH CR LF`, both numbers as 16 lowercase hex digits. The parser is
//! strict where upstream's is lenient (it checks the separators, the CRLF and the kind):
//! a header that does not have this exact shape is damage, and saying so early gives a
//! better error than misreading the payload after it. Pure functions, no I/O.

use thiserror::Error;

/// Bytes in every frame header.
pub const FRAME_LEN: usize = 40;

/// The kind tag of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Meta,
    Data,
    Zero,
    Stop,
    Comp,
}

impl FrameKind {
    fn tag(self) -> &'static [u8; 4] {
        match self {
            FrameKind::Meta => b"meta",
            FrameKind::Data => b"data",
            FrameKind::Zero => b"zero",
            FrameKind::Stop => b"stop",
            FrameKind::Comp => b"comp",
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub start: u64,
    pub length: u64,
}

/// Why 40 bytes are not a frame header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("unknown frame kind {0:?}")]
    UnknownKind(String),
    #[error("expected a space at header byte {0}")]
    MissingSpace(usize),
    #[error("bad hex digits in header bytes {0}..{1}")]
    BadHex(usize, usize),
    #[error("header does not end in CRLF")]
    MissingCrlf,
}

/// Parses one header. Accepts upper- and lowercase hex, as upstream's reader does.
pub fn parse_header(b: &[u8; FRAME_LEN]) -> Result<FrameHeader, FrameError> {
    let kind = match &b[0..4] {
        b"meta" => FrameKind::Meta,
        b"data" => FrameKind::Data,
        b"zero" => FrameKind::Zero,
        b"stop" => FrameKind::Stop,
        b"comp" => FrameKind::Comp,
        other => return Err(FrameError::UnknownKind(String::from_utf8_lossy(other).into())),
    };
    for at in [4, 21] {
        if b[at] != b' ' {
            return Err(FrameError::MissingSpace(at));
        }
    }
    if &b[38..40] != b"\r\n" {
        return Err(FrameError::MissingCrlf);
    }
    Ok(FrameHeader { kind, start: parse_hex(b, 5)?, length: parse_hex(b, 22)? })
}

fn parse_hex(b: &[u8; FRAME_LEN], from: usize) -> Result<u64, FrameError> {
    let digits = &b[from..from + 16];
    let text = std::str::from_utf8(digits).map_err(|_| FrameError::BadHex(from, from + 16))?;
    // from_str_radix accepts a leading '+', which is not a hex digit.
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(FrameError::BadHex(from, from + 16));
    }
    u64::from_str_radix(text, 16).map_err(|_| FrameError::BadHex(from, from + 16))
}

/// Formats a header exactly as upstream's `"%s %016x %016x\r\n"`.
pub fn encode_header(kind: FrameKind, start: u64, length: u64) -> [u8; FRAME_LEN] {
    let mut out = [0u8; FRAME_LEN];
    let text =
        format!("{} {start:016x} {length:016x}\r\n", std::str::from_utf8(kind.tag()).expect("ascii tag"));
    out.copy_from_slice(text.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(s: &[u8]) -> [u8; FRAME_LEN] {
        s.try_into().expect("40 bytes")
    }

    #[test]
    fn parses_the_worked_example_headers() {
        let h = parse_header(&hdr(b"meta 0000000000000000 000000000000013a\r\n")).unwrap();
        assert_eq!(h, FrameHeader { kind: FrameKind::Meta, start: 0, length: 0x13a });
        let h = parse_header(&hdr(b"zero 0000000000000008 0000000000000ff8\r\n")).unwrap();
        assert_eq!(h, FrameHeader { kind: FrameKind::Zero, start: 8, length: 0xff8 });
        let h = parse_header(&hdr(b"data 00000000DEADBEEF 0000000000000001\r\n")).unwrap();
        assert_eq!(h.start, 0xdead_beef);
    }

    #[test]
    fn encode_round_trips() {
        for kind in [FrameKind::Meta, FrameKind::Data, FrameKind::Zero, FrameKind::Stop, FrameKind::Comp] {
            let b = encode_header(kind, 0x1234_5678_9abc, u64::MAX);
            assert_eq!(
                parse_header(&b).unwrap(),
                FrameHeader { kind, start: 0x1234_5678_9abc, length: u64::MAX }
            );
        }
        assert_eq!(&encode_header(FrameKind::Stop, 0, 0), b"stop 0000000000000000 0000000000000000\r\n");
    }

    #[test]
    fn rejects_malformed_headers() {
        assert!(matches!(
            parse_header(&hdr(b"junk 0000000000000000 0000000000000000\r\n")),
            Err(FrameError::UnknownKind(_))
        ));
        assert_eq!(
            parse_header(&hdr(b"data_0000000000000000 0000000000000000\r\n")),
            Err(FrameError::MissingSpace(4))
        );
        assert_eq!(
            parse_header(&hdr(b"data 0000000000000000_0000000000000000\r\n")),
            Err(FrameError::MissingSpace(21))
        );
        assert_eq!(
            parse_header(&hdr(b"data 000000000000000g 0000000000000000\r\n")),
            Err(FrameError::BadHex(5, 21))
        );
        assert_eq!(
            parse_header(&hdr(b"data 0000000000000000 +000000000000000\r\n")),
            Err(FrameError::BadHex(22, 38))
        );
        assert_eq!(
            parse_header(&hdr(b"data 0000000000000000 0000000000000000\n\n")),
            Err(FrameError::MissingCrlf)
        );
    }
}
