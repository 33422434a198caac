//! (being written)

use super::Routes;

pub(super) fn routes(_r: &mut Routes<'_>) {}
