//! A fixed-size bit set of chunk indexes (the agent's dirty and touched sets).

/// Bits `0..len`.
#[derive(Clone, Debug)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
    count: u64,
    /// No bit below this word is set (where the next batch starts looking).
    low: usize,
}

impl Bits {
    pub fn new(len: u64) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
            low: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    #[cfg(test)]
    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let w = (i / 64) as usize;
        let m = 1u64 << (i % 64);
        if self.words[w] & m == 0 {
            self.words[w] |= m;
            self.count += 1;
            self.low = self.low.min(w);
        }
    }

    pub fn set_range(&mut self, start: u64, end: u64) {
        for i in start..end.min(self.len) {
            self.set(i);
        }
    }

    pub fn fill(&mut self) {
        for w in &mut self.words {
            *w = u64::MAX;
        }
        if !self.len.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last = u64::MAX >> (64 - self.len % 64);
            }
        }
        self.count = self.len;
        self.low = 0;
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
        self.low = 0;
    }

    pub fn union(&mut self, other: &Bits) {
        for (i, w) in other.words.iter().enumerate() {
            let mut rest = *w & !self.words[i];
            while rest != 0 {
                let b = rest.trailing_zeros() as u64;
                rest &= rest - 1;
                self.set(i as u64 * 64 + b);
            }
        }
    }

    /// Clears and returns up to `max` set bits, lowest first.
    pub fn take(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while self.low < self.words.len() && out.len() < max {
            let w = &mut self.words[self.low];
            while *w != 0 && out.len() < max {
                let b = w.trailing_zeros() as u64;
                *w &= *w - 1;
                out.push(self.low as u64 * 64 + b);
            }
            if *w == 0 {
                self.low += 1;
            }
        }
        self.count -= out.len() as u64;
        if self.count == 0 {
            self.low = 0;
        }
        out
    }

    /// The set bits as ascending `[start, end)` runs.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut rest = *w;
            while rest != 0 {
                let b = rest.trailing_zeros() as u64;
                rest &= rest - 1;
                let i = wi as u64 * 64 + b;
                match runs.last_mut() {
                    Some(r) if r.1 == i => r.1 += 1,
                    _ => runs.push((i, i + 1)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_ascending_and_clears() {
        let mut b = Bits::new(200);
        for i in [199, 3, 64, 65, 66, 130] {
            b.set(i);
        }
        b.set(3);
        b.set(500);
        assert_eq!(b.count(), 6);
        assert_eq!(b.runs(), vec![(3, 4), (64, 67), (130, 131), (199, 200)]);
        assert_eq!(b.take(2), vec![3, 64]);
        b.set(1);
        assert_eq!(b.take(10), vec![1, 65, 66, 130, 199]);
        assert!(b.is_empty());
        b.fill();
        assert_eq!(b.count(), 200);
        assert_eq!(b.runs(), vec![(0, 200)]);
        let mut c = Bits::new(200);
        c.set(7);
        c.union(&b);
        assert_eq!(c.count(), 200);
        assert!(c.contains(150) && !c.contains(200));
    }
}
