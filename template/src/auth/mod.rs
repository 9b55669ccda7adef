//! Authentication: credentials and, with the orders API, tokens and the default-deny layer.

pub mod password;
