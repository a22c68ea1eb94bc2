//! Training and evaluation data: text and chat sources, tokenization, packing.

pub mod chat;
pub mod cloze;
pub mod corpus;
pub mod formats;
pub mod mc;
pub mod mix;
pub mod outside;
pub mod text;
pub mod wordnet;

pub use text::{load_documents, pack, Sequences};
