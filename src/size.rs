//! Sizes as qemu-img reads and prints them.

/// The largest size or offset qemu-img accepts on its command line (`INT64_MAX`).
pub use cowimg_formats::MAX_SIZE;

/// Why [`parse_size`] refused a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all (`64Q`, `1.5` without a unit, `0x10k`, trailing text).
    Invalid,
    /// A size, but negative or beyond 2^64 - 1.
    OutOfRange,
}

/// Parses a size as qemu's `qemu_strtosz` does, so that every string qemu-img takes means the
/// same here: decimal with an optional fraction and a suffix (B, K, M, G, T, P, E, any case:
/// powers of 1024; `1.5G`, `1.k`, `.5k`; a fraction needs a unit), or hexadecimal (`0x1000`,
/// no fraction, no suffix). Leading whitespace is skipped, nothing may follow. The result may
/// exceed [`MAX_SIZE`]; [`size_arg`] applies qemu-img's range.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    use SizeError::{Invalid, OutOfRange};
    let b = s.as_bytes();
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    // The steps, checks and their order are qemu's (util/cutils.c `do_strtosz`), including
    // which failures are "out of range" and which "invalid": callers word them differently.
    let (mut ret, mut end, mut val) = parse_uint(b);
    let mut valf: u64 = 0;
    'parse: {
        if ret == Err(OutOfRange) {
            break 'parse;
        }
        if ret.is_ok() && val == 0 && matches!(at(end), b'x' | b'X') {
            let (v, e, r) = strtoull(b, 16);
            (val, end) = (v, e);
            if r.is_err() {
                ret = r;
                break 'parse;
            }
            if at(end) == b'.' || suffix_shift(at(end)).is_some() {
                (ret, end) = (Err(Invalid), 0);
                break 'parse;
            }
        } else if at(end) == b'.' || (end == 0 && b.contains(&b'.')) {
            let mut fraction = 0.0f64;
            if ret.is_ok() && at(end) == b'.' && !at(end + 1).is_ascii_digit() {
                // `1.k`: an empty fraction after at least one digit.
                end += 1;
            } else {
                // An `e` is the exabyte suffix, never an exponent.
                let copy = &b[end..];
                let cut = copy
                    .iter()
                    .position(|&c| c == b'e' || c == b'E')
                    .unwrap_or(copy.len());
                let (r, tail, f) = strtod_fraction(&copy[..cut]);
                end += tail;
                (ret, fraction) = (r, f);
                if fraction.is_sign_negative() {
                    ret = Err(OutOfRange);
                    break 'parse;
                }
            }
            if fraction == 1.0 {
                match val.checked_add(1) {
                    Some(v) => val = v,
                    None => {
                        ret = Err(OutOfRange);
                        break 'parse;
                    }
                }
            } else if ret == Err(OutOfRange) {
                // An underflowing fraction is tiny but not zero.
                (valf, ret) = (1, Ok(()));
            } else {
                // A 64-bit binary fraction; any non-zero fraction keeps a non-zero bit.
                valf = (fraction * 18446744073709551616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        }
        if ret.is_err() {
            break 'parse;
        }
        let shift = match suffix_shift(at(end)) {
            Some(shift) => {
                end += 1;
                shift
            }
            None => 0,
        };
        if shift == 0 {
            if valf != 0 {
                // A fraction needs a unit: `1.5` is refused, `1.5k` is 1536.
                (ret, end) = (Err(Invalid), 0);
                break 'parse;
            }
        } else {
            // Exact 64.64 fixed point times the unit, the fraction rounded half up.
            let frac = u128::from(valf) << shift;
            let total = (u128::from(val) << shift) + (frac >> 64) + ((frac >> 63) & 1);
            match u64::try_from(total) {
                Ok(v) => val = v,
                Err(_) => {
                    ret = Err(OutOfRange);
                    break 'parse;
                }
            }
        }
        ret = Ok(());
    }
    if end < b.len() {
        ret = Err(Invalid);
    }
    ret.map(|()| val)
}

/// A size or offset given for the option `name` (qemu-img's `cvtnum`): qemu's forms, between
/// 0 and [`MAX_SIZE`], refused with qemu-img's messages, which name the option in words;
/// `option` is how it is given on the command line ("SIZE", "--speed"), for the hint.
pub fn size_arg(name: &str, option: &str, s: &str) -> crate::error::Result<u64> {
    let refused = |problem, message| crate::error::Error::Size {
        message,
        option: option.to_string(),
        problem,
    };
    match parse_size(s) {
        Ok(v) if v <= MAX_SIZE => Ok(v),
        Err(SizeError::Invalid) => Err(refused(
            SizeError::Invalid,
            format!("Invalid {name} specified: '{s}'."),
        )),
        Ok(_) | Err(SizeError::OutOfRange) => Err(refused(
            SizeError::OutOfRange,
            format!("Invalid {name} specified. Must be between 0 and {MAX_SIZE}."),
        )),
    }
}

/// The unit a suffix letter stands for, as a power of two.
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// C's `isspace` in the C locale (which `is_ascii_whitespace` is not: it leaves out \v).
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// C's `strtoull` for bases 10 and 16: the value (saturated), where parsing stopped (0 when
/// there are no digits) and `OutOfRange` on overflow. Signs are skipped, not applied: the
/// only caller that could see one ([`parse_uint`]) refuses negative input itself.
fn strtoull(b: &[u8], base: u32) -> (u64, usize, Result<(), SizeError>) {
    let mut i = 0;
    while i < b.len() && is_c_space(b[i]) {
        i += 1;
    }
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    // "0x" is a prefix only when a hex digit follows; otherwise the number is the "0".
    if base == 16
        && b.get(i) == Some(&b'0')
        && matches!(b.get(i + 1), Some(b'x' | b'X'))
        && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
    {
        i += 2;
    }
    let digits = i;
    let mut value: u64 = 0;
    let mut ret = Ok(());
    while let Some(d) = b.get(i).and_then(|&c| char::from(c).to_digit(base)) {
        match value
            .checked_mul(u64::from(base))
            .and_then(|v| v.checked_add(u64::from(d)))
        {
            Some(v) => value = v,
            None => {
                value = u64::MAX;
                ret = Err(SizeError::OutOfRange);
            }
        }
        i += 1;
    }
    if i == digits {
        return (0, 0, Err(SizeError::Invalid));
    }
    (value, i, ret)
}

/// qemu's `parse_uint` (decimal): `strtoull` that refuses negative numbers as out of range.
fn parse_uint(b: &[u8]) -> (Result<(), SizeError>, usize, u64) {
    let (value, end, ret) = strtoull(b, 10);
    if ret.is_err() {
        return (ret, end, value);
    }
    let first = b.iter().position(|&c| !is_c_space(c));
    if first.is_some_and(|i| b[i] == b'-') {
        return (Err(SizeError::OutOfRange), end, 0);
    }
    (Ok(()), end, value)
}

/// `strtod` on what can reach it in [`parse_size`] (no exponent: `e` was cut off): optional
/// whitespace and sign, a point and digits. Returns `OutOfRange` on underflow (as strtod sets
/// ERANGE), how much was read (0 when nothing), and the value.
fn strtod_fraction(b: &[u8]) -> (Result<(), SizeError>, usize, f64) {
    let mut i = 0;
    while i < b.len() && is_c_space(b[i]) {
        i += 1;
    }
    let negative = b.get(i) == Some(&b'-');
    if matches!(b.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    if b.get(i) != Some(&b'.') || !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        return (Err(SizeError::Invalid), 0, 0.0);
    }
    let start = i + 1;
    let mut j = start;
    while b.get(j).is_some_and(u8::is_ascii_digit) {
        j += 1;
    }
    let digits = &b[start..j];
    // Digits only, so the text is a valid float literal.
    let text = format!("0.{}", String::from_utf8_lossy(digits));
    let mut f: f64 = text.parse().unwrap_or(0.0);
    let underflow = f < f64::MIN_POSITIVE && digits.iter().any(|&c| c != b'0');
    if negative {
        f = -f;
    }
    (
        if underflow {
            Err(SizeError::OutOfRange)
        } else {
            Ok(())
        },
        j,
        f,
    )
}

/// qemu's `size_to_str`: three significant digits and a binary unit ("196 KiB", "2.19 MiB").
pub fn size_to_str(v: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit switches once the value in the lower unit would reach 1000.
    let scaled = v as f64 / (1000.0 / 1024.0);
    let mut exp = 0i32;
    if scaled >= 1.0 {
        exp = scaled.log2().floor() as i32 + 1;
    }
    let i = ((exp - 1).max(0) / 10) as usize;
    let i = i.min(SUFFIXES.len() - 1);
    let value = v as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(value), SUFFIXES[i])
}

/// C's `%0.3g`.
pub fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let sci = format!("{x:.2e}");
    let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if !(-4..3).contains(&exp) {
        let mant = trim_zeros(mant);
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_size_strings() {
        // Values seen in qemu-img info output.
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(17920), "17.5 KiB");
        assert_eq!(size_to_str(67436544), "64.3 MiB");
        assert_eq!(size_to_str(1114112), "1.06 MiB");
        assert_eq!(size_to_str(2 * 1024 * 1024 + 196608), "2.19 MiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
        assert_eq!(size_to_str(1 << 40), "1 TiB");
    }

    #[test]
    fn sizes_parse_like_qemu() {
        // Each case as qemu-img 10.0.2 reads it (`qemu-img create -f raw x SIZE`).
        use SizeError::{Invalid, OutOfRange};
        let cases: &[(&str, Result<u64, SizeError>)] = &[
            ("64M", Ok(64 << 20)),
            ("100", Ok(100)),
            ("1.5G", Ok(3 << 29)),
            ("4k", Ok(4096)),
            ("0x1000", Ok(4096)),
            ("0X1b", Ok(27)),
            ("1.k", Ok(1024)),
            ("1.", Ok(1)),
            ("1.0", Ok(1)),
            (".5k", Ok(512)),
            (" 5", Ok(5)),
            ("08", Ok(8)),
            ("1b", Ok(1)),
            ("1.5e", Ok(3 << 59)),
            ("0.0001k", Ok(0)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("64Q", Err(Invalid)),
            ("", Err(Invalid)),
            ("1.5", Err(Invalid)),
            ("1e3", Err(Invalid)),
            ("0x", Err(Invalid)),
            ("0x10k", Err(Invalid)),
            ("0x1.8k", Err(Invalid)),
            ("1KiB", Err(Invalid)),
            ("7 ", Err(Invalid)),
            ("-5k", Err(Invalid)),
            ("-1", Err(OutOfRange)),
            ("-.5", Err(OutOfRange)),
            ("18446744073709551616", Err(OutOfRange)),
            ("16E", Err(OutOfRange)),
            ("99999999999E", Err(OutOfRange)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s), *want, "{s:?}");
        }
    }

    #[test]
    fn size_arguments_are_range_checked_like_qemu_img() {
        assert_eq!(
            size_arg("image size", "SIZE", "8E")
                .unwrap_err()
                .to_string(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            size_arg("image size", "SIZE", "18446744073709551615")
                .unwrap_err()
                .to_string(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            size_arg("start offset", "--start-offset", "64Q")
                .unwrap_err()
                .to_string(),
            "Invalid start offset specified: '64Q'."
        );
        assert_eq!(
            size_arg("image size", "SIZE", "9223372036854775807").ok(),
            Some(MAX_SIZE)
        );
    }
}
