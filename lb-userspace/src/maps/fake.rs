//! An in-memory [`MapWriter`](super::MapWriter) for tests: it checks the data path's
//! invariants after every single write and can be told to fail a given write, so tests can
//! show that a failed write never leaves a half-written service behind.
