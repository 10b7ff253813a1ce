//! The replica's background tasks: one tracker and one stop token shared with the backend and
//! the PostgreSQL pools (see [`shoal_shared::background`]).

pub use shoal_shared::background::Background;
