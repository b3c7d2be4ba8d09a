//! Gradient checkpointing: which blocks keep their activations from the forward to the
//! backward and which are re-run from their saved input. `true` re-runs every block (the
//! memory of one block's activations), `false` keeps them all, and `"auto"` keeps as
//! many blocks as the memory free beside the weights holds and re-runs the rest, so a
//! model that fits is never recomputed and one that does not still trains.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The `gradient_checkpointing` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradientCheckpointing {
    /// Re-run every block's forward in the backward (`true`).
    #[default]
    Every,
    /// Keep every block's activations (`false`).
    Off,
    /// Keep the activations of as many blocks as fit in the memory free at the start of
    /// each call, less the backward's working set and a margin; re-run the others.
    Auto,
}

impl GradientCheckpointing {
    /// The names accepted in a config file, a flag or Python.
    pub const ACCEPTED: &'static str = "true, false or \"auto\"";
}

impl From<bool> for GradientCheckpointing {
    fn from(on: bool) -> Self {
        if on {
            GradientCheckpointing::Every
        } else {
            GradientCheckpointing::Off
        }
    }
}

impl std::str::FromStr for GradientCheckpointing {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "on" | "every" => Ok(GradientCheckpointing::Every),
            "false" | "off" | "none" => Ok(GradientCheckpointing::Off),
            "auto" => Ok(GradientCheckpointing::Auto),
            _ => Err(Error::config(format!(
                "gradient_checkpointing '{s}' is not one of {}",
                Self::ACCEPTED
            ))),
        }
    }
}

impl std::fmt::Display for GradientCheckpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradientCheckpointing::Every => "true",
            GradientCheckpointing::Off => "false",
            GradientCheckpointing::Auto => "auto",
        })
    }
}

/// `true` and `false` as booleans (as every config written before `"auto"` has them),
/// `"auto"` as a string.
impl Serialize for GradientCheckpointing {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            GradientCheckpointing::Every => s.serialize_bool(true),
            GradientCheckpointing::Off => s.serialize_bool(false),
            GradientCheckpointing::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for GradientCheckpointing {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(format!(
                "gradient_checkpointing must be {}",
                GradientCheckpointing::ACCEPTED
            ))
        })? {
            Raw::Bool(b) => Ok(b.into()),
            Raw::Name(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How many of `layers` blocks keep their activations when each keeps `per_block`
/// bytes and `room` bytes are theirs to take: as many as fit, at most `layers` (all
/// when a block keeps nothing).
pub fn kept_blocks(layers: usize, room: u64, per_block: u64) -> usize {
    room.checked_div(per_block)
        .map_or(layers, |k| k.min(layers as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_reads_booleans_and_auto() {
        #[derive(Deserialize, Serialize)]
        struct T {
            g: GradientCheckpointing,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.g);
        assert_eq!(read("g = true").unwrap(), GradientCheckpointing::Every);
        assert_eq!(read("g = false").unwrap(), GradientCheckpointing::Off);
        assert_eq!(read("g = \"auto\"").unwrap(), GradientCheckpointing::Auto);
        assert_eq!(read("g = \"AUTO\"").unwrap(), GradientCheckpointing::Auto);
        let e = read("g = \"sometimes\"").unwrap_err().to_string();
        assert!(e.contains("'sometimes'") && e.contains("\"auto\""), "{e}");
        let e = read("g = 3").unwrap_err().to_string();
        assert!(e.contains("true, false or \"auto\""), "{e}");
        // written as the old configs have it
        let w = |g| toml::to_string(&T { g }).unwrap();
        assert_eq!(w(GradientCheckpointing::Every).trim(), "g = true");
        assert_eq!(w(GradientCheckpointing::Off).trim(), "g = false");
        assert_eq!(w(GradientCheckpointing::Auto).trim(), "g = \"auto\"");
        assert_eq!(
            "off".parse::<GradientCheckpointing>().unwrap(),
            false.into()
        );
    }

    #[test]
    fn kept_blocks_fill_the_room() {
        assert_eq!(kept_blocks(32, 99, 100), 0);
        assert_eq!(kept_blocks(32, 100, 100), 1);
        assert_eq!(kept_blocks(32, 1099, 100), 10);
        assert_eq!(kept_blocks(32, u64::MAX, 100), 32);
        assert_eq!(kept_blocks(0, u64::MAX, 100), 0);
        // a block that keeps nothing (no adapters to train in it) costs nothing
        assert_eq!(kept_blocks(4, 0, 0), 4);
    }
}
