pub mod e2e;
pub mod netns;
pub mod packet;
