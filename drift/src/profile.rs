//! Monitoring profiles (filled in next).
