//! placeholder
use super::model::Model;
/// v
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    /** a */
    Apply,
    /** d */
    Delete,
}
/// e
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct ApplyError;
/// c
pub fn change(
    model: &Model,
    _text: &str,
    _source: &str,
    _verb: Verb,
) -> Result<(Model, Vec<String>), ApplyError> {
    Ok((model.clone(), vec![]))
}
