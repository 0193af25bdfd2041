//! The control protocol's types live in [`crate::api`], where the
//! curtailment state and the client take them from too.

pub use crate::api::*;
