//! Fair shares of a replica's bounded resources: how much of one (a tool's concurrency slots, a
//! database pool) one principal may hold at once, so that a principal within its cluster-wide
//! quotas still cannot take all of a replica's capacity of one kind and make every other principal
//! wait behind it.
//!
//! A [`Share`] is entered before the resource is asked for and held as long as it is; past its
//! share a principal is refused at once (its other holdings will free), never queued behind itself.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// A resource and a holder of it.
type Key = (&'static str, Arc<str>);

/// The holdings of every principal on this replica, by resource. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shares {
    held: Arc<Mutex<HashMap<Key, usize>>>,
}

/// One unit of a resource held by a principal; dropping it gives it back.
#[derive(Debug)]
pub struct Share {
    shares: Shares,
    key: Key,
}

/// The most of `capacity` one principal may hold with `percent` (at least one unit).
pub fn share_of(capacity: usize, percent: u8) -> usize {
    (capacity * usize::from(percent.min(100)) / 100).max(1)
}

impl Shares {
    /// Takes one unit of `resource` for `holder`, unless it already holds `max`: then `Err` with
    /// what it holds.
    ///
    /// # Errors
    /// The holder's share is taken.
    pub fn enter(
        &self,
        resource: &'static str,
        holder: &Arc<str>,
        max: usize,
    ) -> Result<Share, usize> {
        let key = (resource, holder.clone());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.clone()).or_default();
        if *count >= max {
            let taken = *count;
            if taken == 0 {
                held.remove(&key);
            }
            return Err(taken);
        }
        *count += 1;
        Ok(Share {
            shares: self.clone(),
            key,
        })
    }

    /// What `holder` holds of `resource` now.
    pub fn held(&self, resource: &'static str, holder: &Arc<str>) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(resource, holder.clone()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_gets_its_share_and_no_more_and_gets_it_back() {
        let shares = Shares::default();
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let first = shares.enter("pool", &alice, 2).expect("first");
        let second = shares.enter("pool", &alice, 2).expect("second");
        assert_eq!(shares.enter("pool", &alice, 2).expect_err("third"), 2);
        // Another holder, and another resource, are not affected.
        let _bob = shares.enter("pool", &bob, 2).expect("bob");
        let _other = shares.enter("tool", &alice, 2).expect("another resource");
        drop(first);
        let _again = shares.enter("pool", &alice, 2).expect("freed");
        drop(second);
        assert_eq!(shares.held("pool", &alice), 1);
        assert!(
            shares.held.lock().expect("lock").len() <= 3,
            "no empty entries kept"
        );
    }

    #[test]
    fn shares_are_a_percentage_of_at_least_one() {
        assert_eq!(share_of(10, 50), 5);
        assert_eq!(share_of(64, 50), 32);
        assert_eq!(share_of(1, 50), 1);
        assert_eq!(share_of(3, 10), 1);
        assert_eq!(share_of(10, 100), 10);
        assert_eq!(share_of(10, 200), 10);
    }
}
