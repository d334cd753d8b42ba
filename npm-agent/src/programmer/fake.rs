//! An in-memory backend for tests of the programmer and of anything above it.
use super::backend::{MapBackend, ProgrammerError};
use super::plan::Op;
use crate::compiler::DesiredMaps;

/// Holds the maps in memory and records every operation it was given.
#[derive(Debug, Default)]
pub struct FakeBackend {
    pub maps: DesiredMaps,
    pub log: Vec<Op>,
}

impl MapBackend for FakeBackend {
    fn dump(&self) -> Result<DesiredMaps, ProgrammerError> {
        Ok(self.maps.clone())
    }

    fn apply(&mut self, op: &Op) -> Result<(), ProgrammerError> {
        op.apply_to(&mut self.maps);
        self.log.push(op.clone());
        Ok(())
    }
}
