pub mod e2e;
pub mod fakeapi;
pub mod netns;
pub mod packet;
