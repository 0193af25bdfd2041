//! Share checking: header rebuilding, SHA-256d, targets. Plain synchronous
//! code with no I/O, so it can be table-tested against mainnet vectors,
//! fuzzed and benchmarked on its own.

mod hash;
mod job;
mod target;
mod validate;

pub use hash::{compress_block, sha256d, sha256d_header, sha256d_pair, Hash256};
pub use job::{build_header, JobTemplate, PrevHash};
pub use target::{Difficulty, Target, HASHES_PER_DIFF1};
pub use validate::{check_share, resolve_version, ShareError, ShareRules, Submission, ValidShare};
