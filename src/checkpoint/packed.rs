//! Matrices stored in a block format ([`Scheme`]): the bytes of `[rows, cols]` as `U8`
//! `[rows, row_bytes]` under the matrix's name with the scheme appended
//! (`….experts.3.gate_proj.weight.q4_k`), so a checkpoint says by itself how each tensor is
//! stored and what shape it stands for.

use crate::error::{Error, Result};
use crate::quant::Scheme;

/// The stored name of matrix `name` packed as `scheme`.
pub fn packed_name(name: &str, scheme: Scheme) -> String {
    format!("{name}.{scheme}")
}

/// The matrix name and scheme of a stored name [`packed_name`] wrote (None for any other name).
pub fn parse_packed_name(stored: &str) -> Option<(&str, Scheme)> {
    let (name, suffix) = stored.rsplit_once('.')?;
    let scheme = Scheme::parse(suffix).ok()?;
    Some((name, scheme))
}

/// The parameters the stored tensor `stored` of shape `shape` stands for when it is a packed
/// matrix (`rows × cols`), with the matrix's name; None for any other tensor.
pub fn packed_parameters<'a>(stored: &'a str, shape: &[usize]) -> Option<(&'a str, usize)> {
    let (name, scheme) = parse_packed_name(stored)?;
    let info = PackedInfo::new(stored, scheme, shape).ok()?;
    Some((name, info.rows * info.cols))
}

/// One packed matrix of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedInfo {
    /// The stored tensor's name.
    pub stored: String,
    /// Its block format.
    pub scheme: Scheme,
    /// Rows of the matrix it stands for.
    pub rows: usize,
    /// Columns of the matrix it stands for.
    pub cols: usize,
}

impl PackedInfo {
    /// The packed matrix `stored` of stored shape `shape` (`U8` `[rows, row_bytes]`), or an
    /// error saying what is wrong with it.
    pub fn new(stored: &str, scheme: Scheme, shape: &[usize]) -> std::result::Result<Self, String> {
        let &[rows, row_bytes] = shape else {
            return Err(format!(
                "packed tensor `{stored}` has shape {shape:?}; expected [rows, bytes per row]"
            ));
        };
        let block = scheme.block_bytes();
        if row_bytes == 0 || row_bytes % block != 0 {
            return Err(format!(
                "packed tensor `{stored}` has {row_bytes} bytes per row; {scheme} rows are whole \
                 blocks of {block} bytes"
            ));
        }
        Ok(Self {
            stored: stored.to_string(),
            scheme,
            rows,
            cols: row_bytes / block * scheme.block_columns(),
        })
    }

    /// The shape of the matrix it stands for.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Its stored bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.scheme.stored_bytes(self.rows, self.cols)
    }
}

/// Dequantises a packed matrix's bytes to f32 values, row-major, naming the tensor on error.
pub fn dequantise(info: &PackedInfo, bytes: &[u8]) -> Result<Vec<f32>> {
    info.scheme
        .dequantise(bytes, info.cols)
        .map_err(|e| Error::InvalidArgument(format!("packed tensor `{}`: {e}", info.stored)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_scheme_and_shapes_the_columns() {
        let scheme = Scheme::parse("int4-g128-sym").unwrap();
        let stored = packed_name("m.experts.3.up_proj.weight", scheme);
        assert_eq!(stored, "m.experts.3.up_proj.weight.int4-g128-sym");
        assert_eq!(
            parse_packed_name(&stored),
            Some(("m.experts.3.up_proj.weight", scheme))
        );
        assert_eq!(parse_packed_name("m.experts.3.up_proj.weight"), None);
        let info = PackedInfo::new(&stored, scheme, &[64, 2 * 66]).unwrap();
        assert_eq!(info.shape(), [64, 256]);
        assert!(PackedInfo::new(&stored, scheme, &[64, 67]).is_err());
        assert!(PackedInfo::new(&stored, scheme, &[64]).is_err());
    }
}
