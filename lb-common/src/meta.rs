//! SVC_META and BE_META: names for lbctl, kept in pinned maps so that lbctl can show them
//! without asking the agent. Only user space reads or writes them.

/// Longest name kept, in bytes.
pub const NAME_LEN: usize = 120;

/// SVC_META value (keyed by svc_id): `namespace/name:port/proto`; BE_META value (keyed by
/// backend id): `namespace/pod`. UTF-8, NUL padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameMeta {
    /// Bytes of `name` in use.
    pub len: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
    /// The name, cut at `NAME_LEN` bytes on a character boundary.
    pub name: [u8; NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<NameMeta>() == 128);

impl Default for NameMeta {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            name: [0; NAME_LEN],
        }
    }
}

impl NameMeta {
    /// Builds a name, cut at `NAME_LEN` bytes on a character boundary.
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(NAME_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut m = Self::default();
        m.name[..end].copy_from_slice(&s.as_bytes()[..end]);
        m.len = end as u32;
        m
    }

    /// The name as text; `<invalid utf-8>` for a map entry someone else wrote badly.
    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid utf-8>")
    }
}

// SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern (`as_str` checks
// the UTF-8 and bounds `len`).
#[cfg(feature = "user")]
// SAFETY: `NameMeta` is repr(C) and Copy, its padding is explicit (size asserted
// above), and any bit pattern is a valid value.
unsafe impl aya::Pod for NameMeta {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn name_meta_cuts_on_char_boundary() {
        let long = "é".repeat(100);
        let m = NameMeta::new(&long);
        assert!(m.as_str().len() <= NAME_LEN);
        assert!(m.as_str().chars().all(|c| c == 'é'));
        assert_eq!(
            NameMeta::new("default/web:http/TCP").as_str(),
            "default/web:http/TCP"
        );
    }
}
