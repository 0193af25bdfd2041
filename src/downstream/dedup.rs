//! Duplicate detection for one miner: the low 64 bits of each accepted
//! share's hash, per open job, with a cap on the entries kept.
//!
//! The keys are already uniform (they are hash bits), so the sets use them
//! as their own hash instead of running SipHash per share. A miner has a
//! handful of open jobs, so they sit in a short vector, not a map.

use nohash_hasher::IntSet;

#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// The cap is reached: the share cannot be checked for duplicates.
    Full,
}

pub struct Seen {
    jobs: Vec<(u64, IntSet<u64>)>,
    len: usize,
    cap: usize,
}

impl Seen {
    pub fn new(cap: usize) -> Seen {
        Seen { jobs: Vec::new(), len: 0, cap }
    }

    pub fn insert(&mut self, job: u64, hash_low: u64) -> Insert {
        let i = match self.jobs.iter().position(|(j, _)| *j == job) {
            Some(i) => i,
            None => {
                self.jobs.push((job, IntSet::default()));
                self.jobs.len() - 1
            }
        };
        let set = &mut self.jobs[i].1;
        if set.contains(&hash_low) {
            return Insert::Duplicate;
        }
        if self.len >= self.cap {
            return Insert::Full;
        }
        set.insert(hash_low);
        self.len += 1;
        Insert::New
    }

    /// Forget the jobs that are no longer open.
    pub fn retain_jobs(&mut self, open: impl Fn(u64) -> bool) {
        self.jobs.retain(|(j, _)| open(*j));
        self.len = self.jobs.iter().map(|(_, s)| s.len()).sum();
    }

    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    pub fn clear(&mut self) {
        self.jobs = Vec::new();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_per_job_and_the_cap_holds() {
        let mut s = Seen::new(3);
        assert_eq!(s.insert(1, 7), Insert::New);
        assert_eq!(s.insert(1, 7), Insert::Duplicate);
        assert_eq!(s.insert(2, 7), Insert::New, "same hash bits on another job is another share");
        assert_eq!(s.insert(2, 8), Insert::New);
        assert_eq!(s.insert(2, 9), Insert::Full);
        assert_eq!(s.insert(2, 8), Insert::Duplicate, "a duplicate is still caught when full");
        s.retain_jobs(|j| j == 2);
        assert_eq!(s.jobs(), 1);
        assert_eq!(s.insert(2, 9), Insert::New, "closing job 1 freed its entries");
    }
}
