//! Option enums that are chosen by name (on the command line, in settings files): one macro gives
//! each its list of values, names, one-line descriptions, `Display` and `FromStr`.

use crate::error::{Error, Result};

/// Finds the value of `values` called `name`; the error lists every valid name.
pub fn parse_named<T: Copy>(
    what: &str,
    name: &str,
    values: &[T],
    name_of: fn(&T) -> &'static str,
) -> Result<T> {
    values
        .iter()
        .find(|v| name_of(v) == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(name_of).collect();
            Error::InvalidArgument(format!(
                "unknown {what} `{name}`: expected one of {}",
                names.join(", ")
            ))
        })
}

/// Declares a named option enum:
///
/// ```ignore
/// named_enum! {
///     /// What the enum is.
///     pub enum Scope ("budget scope") {
///         /// What `layer` means.
///         Layer = "layer": "Each layer keeps its own share",
///     }
/// }
/// ```
///
/// The enum gets `ALL`, `name()`, `description()`, `Display`, `FromStr` (the error names `what`
/// and lists the names) and serde in the same names.
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal : $description:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant ),+
        }

        impl $name {
            /// Every value, in the order the command line lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used on the command line and in saved settings.
            pub fn name(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// One line saying what the value means (for help texts).
            pub fn description(&self) -> &'static str {
                match self { $($name::$variant => $description),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::Error;

            fn from_str(name: &str) -> $crate::Result<Self> {
                $crate::named::parse_named($what, name, Self::ALL, Self::name)
            }
        }
    };
}
