//! Sizes as qemu-img reads and prints them.

/// Parses a size with an optional suffix (B, K, M, G, T, P, E: powers of 1024; a fraction is
/// allowed, as in qemu: `1.5G`). Returns `None` for anything else.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') {
        return None;
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        "p" | "P" | "PiB" => 50,
        "e" | "E" | "EiB" => 60,
        _ => return None,
    };
    let mult = 1u128 << shift;
    let value: u128 = match num.split_once('.') {
        None => num.parse::<u128>().ok()?.checked_mul(mult)?,
        Some((int, frac)) => {
            if frac.is_empty() || frac.contains('.') || shift == 0 {
                return None;
            }
            let whole = int.parse::<u128>().ok()?.checked_mul(mult)?;
            let digits = frac.len().min(18) as u32;
            let f: u128 = frac[..digits as usize].parse().ok()?;
            whole.checked_add(f * mult / 10u128.pow(digits))?
        }
    };
    u64::try_from(value).ok()
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
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("64Q"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999E"), None);
    }
}
