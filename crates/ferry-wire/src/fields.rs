//! Field-level helpers of the payload codec: limits checked on both encode and decode, and a
//! reader whose errors name the message type and frame.

use ferry_format::codec::{Put, Reader};
use ferry_format::FormatError;

use crate::frame::MsgType;
use crate::message::{MAX_DISKS, MAX_NAME};
use crate::WireError;

/// Names (disk, VM, hostname, point id) are 1 to 255 bytes of UTF-8 without control characters,
/// `/` or `\`, and are not `.` or `..`: they end up in store paths.
pub fn check_name(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(format!(
            "{field} of {} bytes (1 to {MAX_NAME} allowed)",
            s.len()
        ));
    }
    if s == "." || s == ".." || s.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        return Err(format!(
            "{field} {s:?} contains '/', '\\' or a control character, or is . or .."
        ));
    }
    Ok(())
}

pub(crate) fn check_count(ty: MsgType, n: usize) -> Result<(), String> {
    if n > MAX_DISKS {
        return Err(format!(
            "{} lists {n} disks (at most {MAX_DISKS})",
            ty.name()
        ));
    }
    Ok(())
}

pub(crate) fn check_range(ty: MsgType, offset: u64, len: u64) -> Result<(), String> {
    if len == 0 || offset.checked_add(len).is_none() {
        return Err(format!(
            "{} range offset {offset} length {len} is empty or overflows",
            ty.name()
        ));
    }
    Ok(())
}

pub(crate) fn unencodable(ty: MsgType, detail: String) -> WireError {
    WireError::Unencodable {
        ty: ty.name(),
        detail,
    }
}

pub(crate) fn malformed(ty: MsgType, frame: u64, detail: String) -> WireError {
    WireError::Malformed {
        frame,
        ty: ty.name(),
        detail,
    }
}

pub(crate) fn put_name(
    out: &mut Vec<u8>,
    ty: MsgType,
    field: &str,
    s: &str,
) -> Result<(), WireError> {
    check_name(field, s).map_err(|d| unencodable(ty, d))?;
    out.put_str(s);
    Ok(())
}

pub(crate) fn put_text(
    out: &mut Vec<u8>,
    ty: MsgType,
    field: &str,
    s: &str,
    max: usize,
) -> Result<(), WireError> {
    if s.len() > max {
        return Err(unencodable(
            ty,
            format!("{field} of {} bytes (at most {max})", s.len()),
        ));
    }
    out.put_str(s);
    Ok(())
}

pub(crate) fn put_disks(
    out: &mut Vec<u8>,
    ty: MsgType,
    disks: &[(String, u64)],
) -> Result<(), WireError> {
    check_count(ty, disks.len()).map_err(|d| unencodable(ty, d))?;
    out.put_u16(disks.len() as u16);
    for (name, v) in disks {
        put_name(out, ty, "disk", name)?;
        out.put_u64(*v);
    }
    Ok(())
}

/// Payload field reader whose errors name the message type and frame.
pub(crate) struct Fields<'a> {
    pub(crate) r: Reader<'a>,
    pub(crate) ty: MsgType,
    pub(crate) frame: u64,
}

impl Fields<'_> {
    /// A list's `u16` length, at most [`MAX_DISKS`].
    pub(crate) fn count(&mut self) -> Result<usize, WireError> {
        let n = self.u16()? as usize;
        check_count(self.ty, n).map_err(|d| self.malformed(d))?;
        Ok(n)
    }

    pub(crate) fn malformed(&self, detail: String) -> WireError {
        malformed(self.ty, self.frame, detail)
    }

    pub(crate) fn format(&self, e: FormatError) -> WireError {
        self.malformed(match e {
            FormatError::Truncated { offset, .. } => {
                format!("the payload ends inside a field at byte {offset}")
            }
            FormatError::Corrupt { offset, detail, .. } => format!("{detail} at byte {offset}"),
            other => other.to_string(),
        })
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        self.r.u8().map_err(|e| self.format(e))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        self.r.u16().map_err(|e| self.format(e))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        self.r.u64().map_err(|e| self.format(e))
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.r.array().map_err(|e| self.format(e))
    }

    pub(crate) fn text(&mut self, field: &str, max: usize) -> Result<String, WireError> {
        let s = self.r.string().map_err(|e| self.format(e))?;
        if s.len() > max {
            return Err(self.malformed(format!("{field} of {} bytes (at most {max})", s.len())));
        }
        Ok(s)
    }

    pub(crate) fn name(&mut self, field: &str) -> Result<String, WireError> {
        let s = self.r.string().map_err(|e| self.format(e))?;
        check_name(field, &s).map_err(|d| self.malformed(d))?;
        Ok(s)
    }

    pub(crate) fn disks(&mut self) -> Result<Vec<(String, u64)>, WireError> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            v.push((self.name("disk")?, self.u64()?));
        }
        Ok(v)
    }
}
